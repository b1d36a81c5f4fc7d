"""SEED: a causal Q-Former image tokenizer whose 1-D tokens stay discriminative and drive an unCLIP decoder.

Ge et al., "Planting a SEED of Vision in Large Language Model" (arXiv:2307.08041) and SEED-LLaMA
(arXiv:2310.01218); reference code AILab-CVC/SEED (``blip2_qformer_casual.py``,
``blip2_qformer_codebook_all_image.py``, ``quantize_semantic.py``). Facts: ``shared/methods/tokenizers.md``
Part 1. Written from those facts; no code copied.

Pipeline (shapes for the ``tiny`` preset / the paper)::

    images (B, 3, S, S) in [-1, 1]
      -> frozen vision tower (timm / open_clip)           patch tokens (B, 64, 64)   / (B, 256, 1408)
      -> ln_vision -> causal Q-Former, N learned queries    E (B, N, W)                / (B, 32, 768)
         self-attention among queries lower-triangular (query i sees queries <= i), full cross-attention
         to the patch tokens every ``cross_attention_freq`` layers
      -> encode_task_layer Linear-Tanh-Linear              z (B, N, d)                / (B, 32, 32)
      -> VQ (argmin ||z - e_k||^2, no normalisation)       ids (B, N) in [0, K)       / K = 8192
      -> decode_task_layer Linear-Tanh-Linear              u (B, N, W)
      -> decoder A: pos_embed + ViT blocks                 E^ (B, N, W)  (training target only)
      -> decoder B: pos_embed_image + ViT blocks + reverse Q-Former (1 query) + Linear
                                                           g (B, G)   generation embedding (G = 1024 unCLIP)
      -> pixels: diffusers ``StableUnCLIPImg2ImgPipeline(image_embeds=g, noise_level=0)`` when
         ``unclip_path`` points at unCLIP weights on disk, else a small learned pixel decoder (CPU stand-in)

Losses (weights from the reference code):
  Stage I  L_itc = 1/2 [CE(s_i2t, y; ls=0.1) + CE(s_t2i, y; ls=0.1)], s = f_I f_T^T / tau, with
           f_I = normalize(vision_proj(E[:, -1])) (the *last* causal query) and f_T = normalize(text_proj(text)).
  Stage II L = 5 L_vq + 2 L_recon + 0.5 L_gen (+ w_pixel L_pixel for the stand-in pixel decoder), with the
           taming "legacy" VQ loss L_vq = ||sg[z_q] - z||^2 + 0.25 ||z_q - sg[z]||^2,
           L_recon = mean(1 - cos(E^, E)), L_gen = MSE(g, g*), g* the generation target (unCLIP's CLIP
           image embedding; here: the pooled embedding of ``gen_tower``, default the frozen vision tower).

Deviations (stated): the text encoder is an open_clip text tower instead of the Q-Former's BERT text
branch; Q-Former layers are pre-norm; tau is clamped to [0.001, 0.5] (BLIP-2); optional dead-code
restart (``restart_dead``; SEED has no anti-collapse mechanism) for tiny codebooks; the CPU pixel decoder
is trained in Stage II on sg[g*] (as unCLIP is trained on real CLIP embeddings) and never on pixels
through the tokenizer.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_img.base import ImageTokenizer, QuantizerOutput
from tokenizers_img.quantizers import VectorQuantizer, codebook_stats
from vision.layers import attention
from vision.towers import (
    CheckpointMismatchError,
    build_text_tower,
    build_vision_tower,
    check_state_dict,
    freeze,
    read_state_dict,
)


@dataclass
class SeedConfig:
    image_size: int = 32
    vision_tower: str = "clip-tiny-32"  # preset or "timm:<name>" / "open_clip:<name>" (vision.towers)
    vision_pretrained: str | None = None  # local checkpoint path or registry tag; None = random
    text_tower: str = "clip-tiny-32"
    text_pretrained: str | None = None
    train_text_tower: bool = True  # a random (tiny) text tower must learn; a pretrained CLIP may stay frozen
    num_queries: int = 8  # 32 in SEED
    width: int = 64  # Q-Former width (768)
    depth: int = 2  # Q-Former layers (12)
    heads: int = 4
    mlp_ratio: float = 4.0
    cross_attention_freq: int = 2  # cross-attention in layers 0, 2, 4, ... (BLIP-2)
    causal: bool = True  # explicit flag instead of SEED's "len == 32" trigger
    itc_dim: int = 64  # 256
    temp_init: float = 0.07
    label_smoothing: float = 0.1
    code_dim: int = 8  # 32
    codebook_size: int = 256  # 8192
    vq_beta: float = 0.25  # legacy placement: on the codebook term
    restart_dead: bool = True  # deviation for tiny runs; False for the paper recipe
    dead_after: int = 50
    decoder_depth: int = 1  # blocks of decoder A and of decoder B (4 + 4)
    reverse_depth: int = 2  # reverse Q-Former layers (4)
    gen_tower: str | None = None  # generation-target tower; None = the frozen vision tower's pooled output
    gen_pretrained: str | None = None
    pixel_channels: int = 64  # stand-in pixel decoder width
    unclip_path: str | None = None  # directory of a saved StableUnCLIPImg2ImgPipeline
    unclip_steps: int = 20
    unclip_guidance: float = 10.0
    w_vq: float = 5.0
    w_recon: float = 2.0
    w_gen: float = 0.5
    w_pixel: float = 1.0


SEED_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # CPU, 32x32 shapes, 8 tokens of a 256-code book
    "small": dict(vision_tower="clip-small-32", text_tower="clip-small-32", num_queries=16, width=128, depth=4,
                  codebook_size=512, code_dim=16, decoder_depth=2),
    # Paper scale: EVA ViT-g/14 (timm), CLIP ViT-H/14 generation target (unCLIP's image encoder), 32 tokens,
    # K = 8192. Point *_pretrained at local weights and unclip_path at stable-diffusion-2-1-unclip.
    "paper": dict(image_size=224, vision_tower="eva-vit-g-14", text_tower="clip-vit-h-14", train_text_tower=False,
                  num_queries=32, width=768, depth=12, heads=12, itc_dim=256, code_dim=32, codebook_size=8192,
                  restart_dead=False, decoder_depth=4, reverse_depth=4, gen_tower="clip-vit-h-14",
                  pixel_channels=128, unclip_steps=20, unclip_guidance=10.0),
}


def seed_config(preset: str = "tiny", **overrides: Any) -> SeedConfig:
    if preset not in SEED_PRESETS:
        raise ValueError(f"unknown SEED preset {preset!r}; choose one of {sorted(SEED_PRESETS)}")
    names = {f.name for f in fields(SeedConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown SeedConfig fields {bad}; known: {sorted(names)}")
    return SeedConfig(**{**SEED_PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------------
# Q-Former
# ------------------------------------------------------------------------------------------------

def causal_mask(n: int, device=None) -> Tensor:
    """(n, n) bool, True = attend: query i sees queries j <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class QFormerLayer(nn.Module):
    """Pre-norm layer: self-attention among queries (optionally causal), optional cross-attention to
    encoder tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, encoder_width: int | None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.has_cross = encoder_width is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(width)
            self.q_cross = nn.Linear(width, width)
            self.kv_cross = nn.Linear(encoder_width, 2 * width)
            self.proj_cross = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, W) -> (B, H, T, W/H)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, enc: Tensor | None, mask: Tensor | None, fused: bool = True) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # (B, N, W) each
        a = attention(self._heads(q), self._heads(k), self._heads(v), mask=mask, fused=fused)  # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        if self.has_cross:
            if enc is None:
                raise ValueError("this Q-Former layer cross-attends: encoder tokens are required")
            q = self.q_cross(self.norm_cross(x))
            k, v = self.kv_cross(enc).chunk(2, dim=-1)  # (B, S, W) each
            a = attention(self._heads(q), self._heads(k), self._heads(v), fused=fused)  # full, unmasked
            x = x + self.proj_cross(a.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class QFormer(nn.Module):
    """Learned queries that read encoder tokens: (B, S, We) -> (B, num_queries, W).

    ``causal=True`` gives SEED's causal Q-Former; ``num_queries=1, causal=False`` its reverse Q-Former.
    ``fused`` switches every attention between SDPA and the reference softmax (same result).
    """

    def __init__(self, num_queries: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 encoder_width: int, cross_attention_freq: int = 2, causal: bool = True) -> None:
        super().__init__()
        self.num_queries, self.causal, self.fused = num_queries, causal, True
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)  # N(0, 0.02)
        self.layers = nn.ModuleList(
            QFormerLayer(width, heads, mlp_ratio, encoder_width if i % cross_attention_freq == 0 else None)
            for i in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, enc: Tensor, queries: Tensor | None = None) -> Tensor:
        x = self.query_tokens.expand(enc.shape[0], -1, -1) if queries is None else queries  # (B, N, W)
        mask = causal_mask(x.shape[1], x.device) if self.causal else None
        for layer in self.layers:
            x = layer(x, enc, mask, fused=self.fused)
        return self.norm(x)


def _tanh_mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def _vit_blocks(width: int, heads: int, depth: int, mlp_ratio: float) -> nn.Sequential:
    """timm-style bidirectional ViT blocks (pre-LN eps 1e-6, qkv bias, GELU) as in SEED's decoders."""
    from timm.models.vision_transformer import Block

    return nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])


class PixelDecoder(nn.Module):
    """CPU stand-in for unCLIP: generation embedding g (B, G) -> image (B, 3, S, S) in [-1, 1]."""

    def __init__(self, gen_dim: int, image_size: int, channels: int = 64) -> None:
        super().__init__()
        if image_size < 4 or image_size & (image_size - 1):
            raise ValueError(f"the stand-in pixel decoder needs a power-of-two image_size >= 4, got {image_size}")
        self.channels = channels
        self.fc = nn.Linear(gen_dim, channels * 16)
        ups = []
        for _ in range(int(math.log2(image_size // 4))):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                    nn.GroupNorm(8 if channels % 8 == 0 else 1, channels), nn.SiLU()]
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, g: Tensor) -> Tensor:
        x = self.fc(g).view(g.shape[0], self.channels, 4, 4)  # (B, C, 4, 4)
        return torch.tanh(self.out(self.up(x)))  # (B, 3, S, S)


# ------------------------------------------------------------------------------------------------
# the tokenizer
# ------------------------------------------------------------------------------------------------

# parameters trained in Stage I (and frozen in Stage II); the vision tower is frozen in both stages
STAGE1_PREFIXES = ("vision_tower.", "ln_vision.", "qformer.", "vision_proj.", "text_proj.", "temp", "text_tower.")


class SeedTokenizer(ImageTokenizer):
    """SEED tokenizer: 1-D causal tokens ``(B, num_queries)`` in [0, codebook_size).

    ``token_grid == (1, num_queries)``; ``encode_latents`` returns the down-projected causal embeddings
    as ``(B, code_dim, 1, N)`` so the shared :class:`VectorQuantizer` (channel-first) applies unchanged.
    """

    def __init__(self, config: SeedConfig | dict | None = None) -> None:
        super().__init__()
        config = SeedConfig(**config) if isinstance(config, dict) else (config or SeedConfig())
        self.config = config
        c = config
        if c.unclip_path is not None and not Path(c.unclip_path).is_dir():
            raise FileNotFoundError(f"unclip_path: no unCLIP pipeline directory at {c.unclip_path!r} "
                                    f"(expected a StableUnCLIPImg2ImgPipeline saved with save_pretrained)")
        self.vision_tower = freeze(build_vision_tower(c.vision_tower, c.vision_pretrained))
        if self.vision_tower.image_size != c.image_size:
            raise ValueError(f"image_size={c.image_size} but vision tower {c.vision_tower!r} takes "
                             f"{self.vision_tower.image_size}x{self.vision_tower.image_size} images")
        self.text_tower = build_text_tower(c.text_tower, c.text_pretrained)
        if not c.train_text_tower:
            freeze(self.text_tower)
        if c.gen_tower is not None:
            self.gen_tower = freeze(build_vision_tower(c.gen_tower, c.gen_pretrained))
            gen_dim = self.gen_tower.embed_dim
        else:
            self.gen_tower = None
            gen_dim = self.vision_tower.embed_dim
        self.gen_dim = gen_dim
        W = c.width
        # Stage I
        self.ln_vision = nn.LayerNorm(self.vision_tower.width)
        self.qformer = QFormer(c.num_queries, W, c.depth, c.heads, c.mlp_ratio, self.vision_tower.width,
                               c.cross_attention_freq, causal=c.causal)
        self.vision_proj = nn.Linear(W, c.itc_dim)
        self.text_proj = nn.Linear(self.text_tower.embed_dim, c.itc_dim)
        self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        # Stage II
        self.encode_task_layer = _tanh_mlp(W, W, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, beta=c.vq_beta, legacy_beta=True,
                                         restart_dead=c.restart_dead, dead_after=c.dead_after)
        self.decode_task_layer = _tanh_mlp(c.code_dim, c.code_dim, W)
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_queries, W) * 0.02)
        self.blocks = _vit_blocks(W, c.heads, c.decoder_depth, c.mlp_ratio)  # decoder A
        self.pos_embed_image = nn.Parameter(torch.randn(1, c.num_queries, W) * 0.02)
        self.blocks_image = _vit_blocks(W, c.heads, c.decoder_depth, c.mlp_ratio)  # decoder B
        self.reverse_qformer = QFormer(1, W, c.reverse_depth, c.heads, c.mlp_ratio, W, 2, causal=False)
        self.distill_image_proj = nn.Linear(W, gen_dim)
        self.pixel_decoder = PixelDecoder(gen_dim, c.image_size, c.pixel_channels)
        self._unclip = None  # loaded lazily from config.unclip_path (not part of the state dict)

    # ---------------------------------------------------------------- interface properties
    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_grid(self) -> tuple[int, int]:
        return (1, self.config.num_queries)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def check_images(self, images: Any) -> None:
        super().check_images(images)
        self.vision_tower.check_images(images)

    # ---------------------------------------------------------------- Stage I
    def causal_embeddings(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> causal Q-Former embeddings E (B, N, W)."""
        with torch.no_grad():
            tokens = self.vision_tower(images).tokens  # (B, P, Wv), frozen
        return self.qformer(self.ln_vision(tokens.float()))

    def image_itc_features(self, embeddings: Tensor) -> Tensor:
        """(B, N, W) -> normalised contrastive feature of the *last* causal query (B, itc_dim)."""
        return F.normalize(self.vision_proj(embeddings[:, -1]), dim=-1)

    def text_itc_features(self, captions: list[str]) -> Tensor:
        if captions is None or isinstance(captions, str) or len(captions) == 0:
            raise ValueError("SEED Stage I needs captions: a list of strings (batch key 'caption')")
        return F.normalize(self.text_proj(self.text_tower(list(captions)).float()), dim=-1)

    def temperature(self) -> Tensor:
        return self.temp.clamp(0.001, 0.5)

    def itc_loss(self, images: Tensor, captions: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Bidirectional contrastive loss with label smoothing (all-gathered across ranks under DDP)."""
        self.check_images(images)
        if captions is None or len(captions) != images.shape[0]:
            n = None if captions is None else len(captions)
            raise ValueError(f"SEED Stage I needs one caption per image: {images.shape[0]} images, {n} captions")
        f_i = self.image_itc_features(self.causal_embeddings(images))  # (B, D)
        f_t = self.text_itc_features(captions)  # (B, D)
        f_i_all, f_t_all, offset = _gather_with_grad(f_i), _gather_with_grad(f_t), _rank_offset(f_i.shape[0])
        tau = self.temperature()
        s_i2t = f_i @ f_t_all.t() / tau  # (B, B_all)
        s_t2i = f_t @ f_i_all.t() / tau
        y = torch.arange(f_i.shape[0], device=images.device) + offset
        ls = self.config.label_smoothing
        loss = 0.5 * (F.cross_entropy(s_i2t, y, label_smoothing=ls) + F.cross_entropy(s_t2i, y, label_smoothing=ls))
        acc = (s_i2t.argmax(1) == y).float().mean()
        return loss, {"itc": loss.detach(), "temp": tau.detach(), "batch_i2t_acc": acc.detach()}

    # ---------------------------------------------------------------- tokenizer pipeline
    def encode_latents(self, images: Tensor) -> Tensor:
        """images -> z (B, code_dim, 1, N) (down-projected causal embeddings)."""
        z = self.encode_task_layer(self.causal_embeddings(images))  # (B, N, d)
        return z.transpose(1, 2).unsqueeze(2)  # (B, d, 1, N)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)  # indices (B, 1, N)

    def indices_to_quantized(self, tokens: Tensor) -> Tensor:
        return self.quantizer.embed(tokens.reshape(tokens.shape[0], 1, -1).long())  # (B, d, 1, N)

    def codebook_embeddings(self) -> Tensor:
        return self.quantizer.get_codebook()  # (K, d)

    def _up(self, quantized: Tensor) -> Tensor:
        return self.decode_task_layer(quantized.squeeze(2).transpose(1, 2))  # (B, N, W)

    def reconstruct_embeddings(self, quantized: Tensor) -> Tensor:
        """Decoder A: quantized (B, d, 1, N) -> E^ (B, N, W)."""
        return self.blocks(self._up(quantized) + self.pos_embed)

    def generation_embedding_from_quantized(self, quantized: Tensor) -> Tensor:
        """Decoder B + reverse Q-Former: quantized (B, d, 1, N) -> g (B, G)."""
        h = self.blocks_image(self._up(quantized) + self.pos_embed_image)  # (B, N, W)
        return self.distill_image_proj(self.reverse_qformer(h)[:, 0])  # (B, G)

    def generation_embedding(self, tokens: Tensor) -> Tensor:
        """token ids (B, N) -> generation embedding g (B, G), what unCLIP is conditioned on."""
        self.check_tokens(tokens)
        return self.generation_embedding_from_quantized(self.indices_to_quantized(tokens))

    @torch.no_grad()
    def generation_target(self, images: Tensor) -> Tensor:
        """g* (B, G): the frozen CLIP image embedding the generation embedding regresses."""
        if self.gen_tower is None:
            return self.vision_tower(images).pooled.float()
        size = self.gen_tower.image_size
        x = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bicubic",
                                                                   align_corners=False).clamp(-1, 1)
        return self.gen_tower(x).pooled.float()

    def decode_latents(self, quantized: Tensor, renderer: str | None = None, **render_kwargs: Any) -> Tensor:
        return self.render(self.generation_embedding_from_quantized(quantized), renderer, **render_kwargs)

    def decode(self, indices: Tensor, renderer: str | None = None, **render_kwargs: Any) -> Tensor:
        """token ids (B, N) -> images (B, 3, S, S); ``renderer`` "unclip" | "pixel" | None (unCLIP if configured)."""
        self.check_tokens(indices)
        return self.decode_latents(self.indices_to_quantized(indices), renderer, **render_kwargs)

    def render(self, g: Tensor, renderer: str | None = None, **kwargs: Any) -> Tensor:
        if renderer is None:
            renderer = "unclip" if self.config.unclip_path else "pixel"
        if renderer == "pixel":
            return self.pixel_decoder(g.float())
        if renderer == "unclip":
            return self.render_unclip(g, **kwargs)
        raise ValueError(f"renderer must be 'unclip' or 'pixel', got {renderer!r}")

    # ---------------------------------------------------------------- unCLIP
    def unclip_pipeline(self):
        """The diffusers ``StableUnCLIPImg2ImgPipeline`` at ``config.unclip_path`` (loaded once)."""
        if self._unclip is None:
            path = self.config.unclip_path
            if path is None:
                raise ValueError("renderer='unclip' needs config.unclip_path (a saved StableUnCLIPImg2ImgPipeline)")
            if not Path(path).is_dir():
                raise FileNotFoundError(f"unclip_path: no unCLIP pipeline directory at {path!r}")
            from diffusers import StableUnCLIPImg2ImgPipeline

            pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(path)
            emb = int(pipe.image_normalizer.mean.shape[-1])
            if emb != self.gen_dim:
                raise ValueError(f"unCLIP pipeline at {path!r} takes {emb}-d image embeddings but this tokenizer's "
                                 f"generation embedding has {self.gen_dim} dims (gen_tower={self.config.gen_tower!r})")
            pipe.set_progress_bar_config(disable=True)
            self._unclip = pipe
        return self._unclip

    @torch.no_grad()
    def render_unclip(self, g: Tensor, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      generator: torch.Generator | None = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        """g (B, G) -> images (B, 3, H, W) in [-1, 1] via unCLIP with ``image_embeds=g, noise_level=0``."""
        pipe = self.unclip_pipeline().to(g.device)
        c = self.config
        out = pipe(prompt=[""] * g.shape[0], image_embeds=g.to(pipe.unet.dtype), noise_level=0,
                   num_inference_steps=num_inference_steps or c.unclip_steps,
                   guidance_scale=c.unclip_guidance if guidance_scale is None else guidance_scale,
                   height=height or c.image_size, width=width or c.image_size, generator=generator,
                   output_type="pt")
        return out.images.float() * 2 - 1  # [0, 1] -> [-1, 1], (B, 3, H, W)

    # ---------------------------------------------------------------- Stage II
    def stage2_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """5 L_vq + 2 L_recon + 0.5 L_gen (+ w_pixel L_pixel); Stage I parts receive no gradient."""
        self.check_images(images)
        c = self.config
        with torch.no_grad():
            E = self.causal_embeddings(images)  # (B, N, W) frozen target
            g_star = self.generation_target(images)  # (B, G)
        z = self.encode_task_layer(E).transpose(1, 2).unsqueeze(2)  # (B, d, 1, N)
        q = self.quantize(z)
        E_hat = self.reconstruct_embeddings(q.quantized)
        l_recon = (1 - F.cosine_similarity(E_hat.float(), E.float(), dim=-1)).mean()
        g = self.generation_embedding_from_quantized(q.quantized)
        l_gen = F.mse_loss(g.float(), g_star)
        l_pix = F.mse_loss(self.pixel_decoder(g_star), images.float())
        loss = c.w_vq * q.loss + c.w_recon * l_recon + c.w_gen * l_gen + c.w_pixel * l_pix
        logs = {"vq": q.loss.detach(), "recon_cos": l_recon.detach(), "gen_mse": l_gen.detach(),
                "pixel_mse": l_pix.detach(), "usage_batch": q.stats["usage"]}
        return loss, logs

    @torch.no_grad()
    def retrieval_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (continuous f_I, quantized f_I, token ids): quantized features come from the decoder-A
        reconstruction of the tokens' causal embeddings (SEED's "causal codes")."""
        E = self.causal_embeddings(images)
        q = self.quantize(self.encode_task_layer(E).transpose(1, 2).unsqueeze(2))
        E_hat = self.reconstruct_embeddings(q.quantized)
        return self.image_itc_features(E), self.image_itc_features(E_hat), q.indices.reshape(images.shape[0], -1)

    def stage1_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(STAGE1_PREFIXES)}

    def load_stage1(self, source: str | os.PathLike) -> None:
        """Load the Stage-I weights (Q-Former, projections, temperature, towers) from a Lightning
        ``.ckpt``, a ``save_pretrained`` directory or a state-dict file; other keys are ignored."""
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"stage1_checkpoint: no such file {str(source)!r}")
        state = read_state_dict(path)
        if any(k.startswith("tokenizer.") for k in state):
            state = {k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")}
        ours = {k: v for k, v in state.items() if k.startswith(STAGE1_PREFIXES)}
        ref = _Sub(self.stage1_state_dict())
        try:
            check_state_dict(ref, ours, source=str(path), what="SEED Stage-I weights")
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"{err} (was the Stage-I run made with the same SEED config?)") from err
        self.load_state_dict({**self.state_dict(), **ours}, strict=True)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory, *, config: Any = None, **kwargs: Any):
        if config is None:  # weights live in model.safetensors: do not point at the original tower files
            config = asdict(replace(self.config, vision_pretrained=None, text_pretrained=None, gen_pretrained=None))
        return super().save_pretrained(save_directory, config=config, **kwargs)


class _Sub(nn.Module):
    """Holds a state dict so :func:`check_state_dict` can compare against it."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: ARG002
        return self._state


def _gather_with_grad(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _rank_offset(batch: int) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * batch
    return 0


# ------------------------------------------------------------------------------------------------
# retrieval metric
# ------------------------------------------------------------------------------------------------

def retrieval_top1(image_features: Tensor, text_features: Tensor, captions: list[str],
                   gallery: int | None = None) -> dict[str, float]:
    """Image->text and text->image top-1 accuracy over galleries of ``gallery`` pairs.

    Shapes captions repeat, so a hit is a retrieved item whose caption *string* equals the query's.
    image_features, text_features: (M, D) normalised; returns {"i2t": acc, "t2i": acc}.
    """
    m = image_features.shape[0]
    if text_features.shape[0] != m or len(captions) != m:
        raise ValueError("need one caption and one text feature per image")
    gallery = gallery or m
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap = torch.tensor([ids[c] for c in captions])
    hits_i2t = hits_t2i = total = 0
    for start in range(0, m, gallery):
        sl = slice(start, min(start + gallery, m))
        s = image_features[sl].float() @ text_features[sl].float().t()  # (g, g)
        c = cap[sl]
        hits_i2t += int((c[s.argmax(1)] == c).sum())
        hits_t2i += int((c[s.argmax(0)] == c).sum())
        total += s.shape[0]
    return {"i2t": hits_i2t / total, "t2i": hits_t2i / total}


# ------------------------------------------------------------------------------------------------
# a tiny random unCLIP pipeline (tests, CPU demos)
# ------------------------------------------------------------------------------------------------

def build_tiny_unclip_pipeline(directory: str | os.PathLike, embed_dim: int, image_size: int = 32, seed: int = 0):
    """Save a randomly initialised ``StableUnCLIPImg2ImgPipeline`` with tiny components to ``directory``.

    Exercises the exact diffusers code path that SEED uses with ``stable-diffusion-2-1-unclip`` (whose
    image embedding has 1024 dims); pictures from random weights are noise. Returns the pipeline.
    """
    import json

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # an offline CLIP BPE tokenizer with a handful of tokens
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
    tok_dir = directory / "_tok"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"),
                              model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=8, projection_dim=embed_dim))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=image_size)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=image_size, size=image_size),
        image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
        text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae)
    pipe.save_pretrained(directory)
    return pipe


# ------------------------------------------------------------------------------------------------
# Lightning wrapper
# ------------------------------------------------------------------------------------------------

def _warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LAVIS ``linear_warmup_cosine_lr`` as a multiplier of the peak lr."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on >= 2-D weights only (not biases, norms, embeddings of shape (1, N, W) included)."""
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(("pos_embed", "pos_embed_image", "query_tokens"))]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for _, p in named if id(p) not in ids], "weight_decay": 0.0}]


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save images in [-1, 1] (B, 3, H, W) as one PNG (written to a temporary name, then renamed)."""
    import tempfile

    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    save_image((images.float().clamp(-1, 1) + 1) / 2, tmp, nrow=nrow, format="png")
    os.replace(tmp, path)
    return path


from lightning.pytorch import LightningModule  # noqa: E402  (the wrapper below; the tokenizer is Lightning-free)


class SeedModule(LightningModule):
    """Trains :class:`SeedTokenizer`: ``stage=1`` (causal Q-Former ITC) or ``stage=2`` (VQ + decoders).

    Stage 2 loads the Stage-I weights from ``stage1_checkpoint`` (the Stage-I run's ``last.ckpt``, a
    ``save_pretrained`` directory or a state-dict file) and freezes them. Logs ``val/loss``, retrieval
    top-1 (``val/i2t_cont``, ``val/t2i_cont``; Stage II also ``val/i2t_quant``, ``val/t2i_quant``),
    ``val/usage`` and a reconstruction grid PNG (Stage II) under ``<log_dir>/samples``.
    """

    def __init__(self, stage: int = 1, preset: str = "tiny", overrides: dict[str, Any] | None = None,
                 stage1_checkpoint: str | None = None, lr: float = 1e-3, min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.05, warmup_steps: int = 100, betas: tuple[float, float] = (0.9, 0.999),
                 retrieval_gallery: int = 100, num_sample_images: int = 16) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.save_hyperparameters()
        self.tokenizer = SeedTokenizer(seed_config(preset, **(overrides or {})))
        if stage == 2:
            if stage1_checkpoint is None:
                raise ValueError("stage=2 needs stage1_checkpoint (the Stage-I run's checkpoints/last.ckpt)")
            self.tokenizer.load_stage1(stage1_checkpoint)
        self._set_trainable()
        self._val: dict[str, list] = {}

    def _set_trainable(self) -> None:
        stage1 = self.hparams.stage == 1
        for name, p in self.tokenizer.named_parameters():
            in_stage1 = name.startswith(STAGE1_PREFIXES)
            trainable = in_stage1 if stage1 else not in_stage1
            if name.startswith(("vision_tower.", "gen_tower.")):
                trainable = False
            if name.startswith("text_tower.") and not self.tokenizer.config.train_text_tower:
                trainable = False
            p.requires_grad_(trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        tok = self.tokenizer
        frozen = [tok.vision_tower, tok.gen_tower]
        if self.hparams.stage == 2:
            frozen += [tok.ln_vision, tok.qformer, tok.vision_proj, tok.text_proj, tok.text_tower]
        for m in frozen:
            if m is not None:
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.tokenizer.encode(images)

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        images = batch["image"]
        if self.hparams.stage == 1:
            if "caption" not in batch:
                raise ValueError("SEED Stage I needs captions: the batch has no 'caption' key "
                                 "(use datasets.shapes.ShapesDataModule or a captions file)")
            loss, logs = self.tokenizer.itc_loss(images, batch["caption"])
        else:
            loss, logs = self.tokenizer.stage2_loss(images)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=stage != "train")
        for k, v in logs.items():
            self.log(f"{stage}/{k}", v, batch_size=images.shape[0], sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self._val = {"cont": [], "quant": [], "text": [], "captions": [], "ids": [], "images": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "val")
        tok = self.tokenizer
        with torch.no_grad():
            cont, quant, ids = tok.retrieval_features(batch["image"])
            self._val["cont"].append(cont.float().cpu())
            self._val["quant"].append(quant.float().cpu())
            self._val["ids"].append(ids.cpu())
            if "caption" in batch:
                self._val["text"].append(tok.text_itc_features(batch["caption"]).float().cpu())
                self._val["captions"] += list(batch["caption"])
            if sum(x.shape[0] for x in self._val["images"]) < self.hparams.num_sample_images:
                self._val["images"].append(batch["image"][: self.hparams.num_sample_images].cpu())
        return loss

    def on_validation_epoch_end(self) -> None:
        v, tok = self._val, self.tokenizer
        if not v.get("cont"):
            return
        ids = torch.cat(v["ids"])
        self.log("val/usage", codebook_stats(ids, tok.vocab_size)["usage"])
        if v["text"]:
            text = torch.cat(v["text"])
            for kind in ("cont", "quant") if self.hparams.stage == 2 else ("cont",):
                r = retrieval_top1(torch.cat(v[kind]), text, v["captions"], self.hparams.retrieval_gallery)
                self.log(f"val/i2t_{kind}", r["i2t"])
                self.log(f"val/t2i_{kind}", r["t2i"])
        if self.hparams.stage == 2 and v["images"] and self._trainer is not None and self.trainer.is_global_zero:
            images = torch.cat(v["images"])[: self.hparams.num_sample_images].to(self.device)
            with torch.no_grad():
                recon = tok.decode(tok.encode(images), renderer="pixel")
            root = self.trainer.log_dir or self.trainer.default_root_dir
            save_image_grid(torch.cat([images, recon.to(images.dtype)]), Path(root) / "samples" /
                            f"seed_recon_step{self.global_step:06d}.png", nrow=8)

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.tokenizer.named_parameters() if p.requires_grad]
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(named, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
