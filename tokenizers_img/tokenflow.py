"""TokenFlow: a dual-codebook image tokenizer (semantic + pixel halves under one shared index).

Qu et al., "TokenFlow: Unified Image Tokenizer for Multimodal Understanding and Generation",
CVPR 2025 (arXiv:2412.03069); reference code ByteFlow-AI/TokenFlow (``tokenflow/tokenizer/vq_model.py``,
``vq_loss.py``, ``vqkd_model.py``). Facts: ``shared/methods/tokenizers.md`` Part 2. Written from those
facts; no code copied.

Shapes for the ``tiny`` preset (paper TokenFlow-B in brackets)::

    x (B, 3, 32, 32) in [-1, 1]                                          [(B, 3, 224, 224)]
    semantic: ViT tower (trainable, initialised from the frozen teacher) -> (B, 64, W) patch tokens
              -> Linear-Tanh-Linear -> z_sem (B, 16, 8, 8)                [(B, 32, 14, 14)]
    pixel:    VQGAN-style conv encoder (x4 down)  -> z_pix (B, 4, 8, 8)   [(B, 8, 14, 14), x16]
    z = [z_sem; z_pix] (B, 20, 8, 8), each half l2-normalised
    multi-scale residual quantization over scales (1, 2, 4, 6, 8) with ONE id per position:
        i* = argmin_k  d_sem(k) + w_pix * d_pix(k),   d(k) = ||z||^2 + ||e_k||^2 - 2 z.e_k      (Eqs. 1-3)
        z_q = [E_sem[i*]; E_pix[i*]] (both rows unit-norm), STE, r_k = r_{k-1} - sg(Q_k), scale drop p=0.1
    f^ (B, 20, 8, 8) -> semantic half -> ViT decoder (patch 1) -> teacher space (B, 64, D_t), cos loss
                     -> pixel half    -> conv decoder -> x^ (B, 3, 32, 32)

Token layout (what ``encode`` returns): the ids of all scales concatenated coarse to fine, raster order
within a scale: (B, sum_s h_s*w_s) = (B, 1 + 4 + 16 + 36 + 64) = (B, 121). ``seq_len`` is that sum,
``token_grid`` is (1, seq_len) (a 1-D sequence for the AR model, so h*w == seq_len as for every tokenizer)
and ``final_grid`` the last scale's (8, 8); an AR generator predicts the 121 ids left to right unchanged.
``decode(ids)`` equals ``decode_latents(quantize(encode_latents(x)).quantized)`` in eval mode.

Losses (code's weights): L = L_sem (1 - cos to the teacher's patch features) + MSE(x, x^) + w_lpips LPIPS
+ 0.5 [step >= disc_start] (-mean D(x^)) + VQ (codebook + 0.25 commitment, averaged over scales); the
PatchGAN discriminator is trained with the hinge loss. Optimizer Adam(1e-4, betas (0.9, 0.95)), clip 1.0.

Deviations (stated): LPIPS needs VGG weights that are not available offline, so ``w_lpips`` defaults to
0 (slot kept); the semantic encoder sees the tower's own normalisation (the CLIP-B code feeds raw [-1, 1]);
the GAN delay is given in steps of the run (about a third of it) instead of 20k.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from tokenizers_img.base import ImageTokenizer, QuantizerOutput
from tokenizers_img.quantizers import MultiScaleResidualQuantizer, codebook_stats
from vision.towers import build_vision_tower, freeze


@dataclass
class TokenFlowConfig:
    image_size: int = 32
    semantic_tower: str = "clip-tiny-32"  # vision.towers preset or "timm:<name>" / "open_clip:<name>"
    teacher_pretrained: str | None = None  # the teacher's weights; the semantic encoder starts from them
    sem_dim: int = 16  # 32 in the paper
    pix_dim: int = 4  # 8 in the paper
    codebook_size: int = 1024  # 32768
    scales: tuple[int, ...] = (1, 2, 4, 6, 8)  # last = token grid (image_size / patch)
    scale_drop_prob: float = 0.1
    w_pix_dist: float = 1.0  # w_dis of the shared mapping (fixed 1.0 in the paper)
    beta: float = 0.25  # commitment weight
    pixel_channels: int = 32  # VQGAN width (128)
    ch_mult: tuple[int, ...] = (1, 2, 2)  # len - 1 downsamples: 32 -> 8
    num_res_blocks: int = 1  # 2 (encoder) / 3 (decoder)
    sem_decoder_width: int = 64  # 768
    sem_decoder_depth: int = 1  # 3
    sem_decoder_heads: int = 4
    w_sem: float = 1.0
    w_rec: float = 1.0
    w_lpips: float = 0.0  # slot: LPIPS weights are not available offline
    w_gan: float = 0.5
    disc_start: int = 2000  # generator GAN term and discriminator start at this step
    disc_channels: int = 32  # 64
    disc_layers: int = 2  # 3


TOKENFLOW_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # the workbench classifier ViT (vision.classifier, preset "tiny") as teacher: 8x8 grid, width 192
    "tiny-classifier": dict(semantic_tower="timm-vit-classifier-tiny"),
    # TokenFlow-B: OpenAI CLIP ViT-B/16 teacher at 224, 14x14 grid, K = 32768, 32/8 split
    "B": dict(image_size=224, semantic_tower="clip-vit-b-16", sem_dim=32, pix_dim=8, codebook_size=32768,
              scales=(1, 2, 4, 6, 8, 10, 12, 14), pixel_channels=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
              sem_decoder_width=768, sem_decoder_depth=3, sem_decoder_heads=12, disc_start=20000,
              disc_channels=64, disc_layers=3, w_lpips=1.0),
}


def tokenflow_config(preset: str = "tiny", **overrides: Any) -> TokenFlowConfig:
    if preset not in TOKENFLOW_PRESETS:
        raise ValueError(f"unknown TokenFlow preset {preset!r}; choose one of {sorted(TOKENFLOW_PRESETS)}")
    names = {f.name for f in fields(TokenFlowConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown TokenFlowConfig fields {bad}; known: {sorted(names)}")
    values = {**TOKENFLOW_PRESETS[preset], **overrides}
    for key in ("scales", "ch_mult"):
        if key in values:
            values[key] = tuple(values[key])
    return TokenFlowConfig(**values)


# ------------------------------------------------------------------------------------------------
# shared mapping (plugged into the quantizer library through lookup_fn / normalize_fn)
# ------------------------------------------------------------------------------------------------

def per_half_normalize(x: Tensor, sem_dim: int) -> Tensor:
    """l2-normalise the semantic (first ``sem_dim``) and pixel channels of x (..., D) separately."""
    return torch.cat([F.normalize(x[..., :sem_dim], dim=-1, eps=1e-6),
                      F.normalize(x[..., sem_dim:], dim=-1, eps=1e-6)], dim=-1)


def shared_distance(z: Tensor, codebook: Tensor, sem_dim: int, w_pix: float) -> Tensor:
    """d_sem + w_pix * d_pix, each d = ||z||^2 + ||e||^2 - 2 z.e: z (N, D), codebook (K, D) -> (N, K)."""
    def d(a: Tensor, e: Tensor) -> Tensor:
        return (a * a).sum(1, keepdim=True) + (e * e).sum(1)[None] - 2 * a @ e.t()

    return d(z[:, :sem_dim], codebook[:, :sem_dim]) + w_pix * d(z[:, sem_dim:], codebook[:, sem_dim:])


def shared_index_lookup(z: Tensor, codebook: Tensor, sem_dim: int, w_pix: float, chunk: int = 4096) -> Tensor:
    """One id for both codebooks: argmin_k d_sem + w_pix d_pix. z (N, D), codebook (K, D) -> (N,)."""
    out = [shared_distance(zc, codebook, sem_dim, w_pix).argmin(1) for zc in z.split(chunk)]
    return torch.cat(out) if out else z.new_zeros(0, dtype=torch.long)


def shared_index_lookup_ref(z: Tensor, codebook: Tensor, sem_dim: int, w_pix: float) -> Tensor:
    """Brute-force reference: explicit squared differences per half."""
    ds = ((z[:, None, :sem_dim] - codebook[None, :, :sem_dim]) ** 2).sum(-1)  # (N, K)
    dp = ((z[:, None, sem_dim:] - codebook[None, :, sem_dim:]) ** 2).sum(-1)
    return (ds + w_pix * dp).argmin(1)


# ------------------------------------------------------------------------------------------------
# pixel branch (VQGAN-style) and discriminator
# ------------------------------------------------------------------------------------------------

def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                   _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class PixelEncoder(nn.Module):
    """x (B, 3, H, W) -> z_pix (B, pix_dim, H / 2^(L-1), W / 2^(L-1)) (taming/LlamaGen layout, no attention)."""

    def __init__(self, out_dim: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ch * ch_mult[0], 3, padding=1)]
        c = ch * ch_mult[0]
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # downsample x2
        layers += [ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PixelDecoder(nn.Module):
    """quantized pixel half (B, pix_dim, h, w) -> x^ (B, 3, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, in_dim: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> None:
        super().__init__()
        c = ch * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_dim, c, 3, padding=1), ResBlock(c, c)]
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class PatchDiscriminator(nn.Module):
    """PatchGAN ``NLayerDiscriminator`` (kernel 4, BatchNorm, LeakyReLU 0.2, N(0, 0.02) init)."""

    def __init__(self, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_next = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SemanticDecoder(nn.Module):
    """Semantic half (B, sem_dim, h, w) -> teacher space (B, h*w, D_t): ViT at patch size 1 + Linear-Tanh-Linear."""

    def __init__(self, sem_dim: int, num_tokens: int, width: int, depth: int, heads: int, out_dim: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(sem_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                      for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        self.decode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))

    def forward(self, sem: Tensor) -> Tensor:
        x = self.embed(sem.flatten(2).transpose(1, 2)) + self.pos_embed  # (B, N, width)
        return self.decode_task_layer(self.fc_norm(self.blocks(x)))  # (B, N, D_t)


# ------------------------------------------------------------------------------------------------
# the tokenizer
# ------------------------------------------------------------------------------------------------

class TokenFlowTokenizer(ImageTokenizer):
    """TokenFlow tokenizer (see the module docstring for shapes and the token layout)."""

    def __init__(self, config: TokenFlowConfig | dict | None = None) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = TokenFlowConfig(**{k: tuple(v) if k in ("scales", "ch_mult") else v for k, v in config.items()})
        config = config or TokenFlowConfig()
        self.config = c = config
        self.teacher = freeze(build_vision_tower(c.semantic_tower, c.teacher_pretrained))
        if self.teacher.image_size != c.image_size:
            raise ValueError(f"image_size={c.image_size} but tower {c.semantic_tower!r} takes "
                             f"{self.teacher.image_size}x{self.teacher.image_size} images")
        self.semantic_encoder = copy.deepcopy(self.teacher)  # initialised from the teacher, trainable
        for p in self.semantic_encoder.parameters():
            p.requires_grad_(True)
        grid = self.teacher.grid_size
        if tuple(grid) != (c.scales[-1], c.scales[-1]):
            raise ValueError(f"the last scale {c.scales[-1]} must equal the semantic token grid {grid}")
        down = 2 ** (len(c.ch_mult) - 1)
        if c.image_size // down != grid[0]:
            raise ValueError(f"pixel encoder grid {c.image_size // down} (image_size / 2^(len(ch_mult)-1)) must "
                             f"equal the semantic grid {grid[0]}; adjust ch_mult")
        W = self.teacher.width
        self.encode_task_layer = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, c.sem_dim))
        self.pixel_encoder = PixelEncoder(c.pix_dim, c.pixel_channels, c.ch_mult, c.num_res_blocks)
        self.quantizer = MultiScaleResidualQuantizer(
            c.codebook_size, c.sem_dim + c.pix_dim, scales=c.scales, shared_codebook=True, beta=c.beta,
            l2_norm=True, scale_drop_prob=c.scale_drop_prob,
            lookup_fn=partial(shared_index_lookup, sem_dim=c.sem_dim, w_pix=c.w_pix_dist),
            normalize_fn=partial(per_half_normalize, sem_dim=c.sem_dim))
        self.semantic_decoder = SemanticDecoder(c.sem_dim, grid[0] * grid[1], c.sem_decoder_width,
                                                c.sem_decoder_depth, c.sem_decoder_heads, W)
        self.pixel_decoder = PixelDecoder(c.pix_dim, c.pixel_channels, c.ch_mult, c.num_res_blocks)

    # ---------------------------------------------------------------- interface properties
    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """(1, seq_len): the multi-scale sequence is 1-D for an AR model (h*w == seq_len holds);
        the spatial grid of the last scale is :attr:`final_grid`."""
        return (1, self.seq_len)

    @property
    def final_grid(self) -> tuple[int, int]:
        return tuple(self.teacher.grid_size)

    @property
    def seq_len(self) -> int:
        return self.quantizer.num_tokens  # sum over scales of h_s * w_s

    @property
    def downsample(self) -> int:
        return self.teacher.patch_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def scale_token_counts(self) -> list[int]:
        return self.quantizer.tokens_per_scale

    def check_images(self, images: Any) -> None:
        super().check_images(images)
        self.teacher.check_images(images)

    # ---------------------------------------------------------------- pipeline
    def encode_latents(self, images: Tensor) -> Tensor:
        """images -> z = [z_sem; z_pix] (B, sem_dim + pix_dim, h, w) (not yet normalised)."""
        h, w = self.final_grid
        tokens = self.semantic_encoder(images).tokens  # (B, h*w, W)
        z_sem = self.encode_task_layer(tokens).transpose(1, 2).reshape(images.shape[0], -1, h, w)
        z_pix = self.pixel_encoder(images.float())  # (B, pix_dim, h, w)
        return torch.cat([z_sem.float(), z_pix.float()], dim=1)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)  # f^ (B, D, h, w), ids (B, sum s^2)

    def indices_to_quantized(self, tokens: Tensor) -> Tensor:
        return self.quantizer.embed(tokens.long())  # (B, D, h, w)

    def codebook_embeddings(self) -> Tensor:
        return self.quantizer.quantizers[0].get_codebook()  # (K, sem_dim + pix_dim), per-half unit norm

    def split(self, quantized: Tensor) -> tuple[Tensor, Tensor]:
        s = self.config.sem_dim
        return quantized[:, :s], quantized[:, s:]

    def decode_latents(self, quantized: Tensor) -> Tensor:
        return self.pixel_decoder(self.split(quantized)[1])  # (B, 3, H, W)

    def decode_semantic(self, quantized: Tensor) -> Tensor:
        """quantized (B, D, h, w) -> semantic reconstruction in teacher space (B, h*w, D_t)."""
        return self.semantic_decoder(self.split(quantized)[0])

    def semantic_features(self, ids: Tensor, level: str = "codebook") -> Tensor:
        """Understanding path. ids (B, seq_len) -> (B, h*w, .):

        ``level="codebook"``: the semantic half of the final accumulated quantized feature f^ (B, h*w, sem_dim),
        what TokenFlow feeds a multimodal LLM through an MLP adapter ("last scale" input);
        ``level="decoded"``: the semantic decoder's reconstruction of the teacher features (B, h*w, D_t).
        """
        self.check_tokens(ids)
        f_hat = self.indices_to_quantized(ids)
        if level == "codebook":
            return self.split(f_hat)[0].flatten(2).transpose(1, 2)
        if level == "decoded":
            return self.decode_semantic(f_hat)
        raise ValueError(f"level must be 'codebook' or 'decoded', got {level!r}")

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        return self.teacher(images).tokens.float()  # (B, h*w, D_t)

    def losses(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Generator losses without the GAN term -> (loss, reconstruction, logs)."""
        self.check_images(images)
        c = self.config
        q = self.quantize(self.encode_latents(images))
        recon = self.decode_latents(q.quantized)
        sem = self.decode_semantic(q.quantized)
        target = self.teacher_features(images)
        l_sem = (1 - F.cosine_similarity(sem.float(), target, dim=-1)).mean()
        l_rec = F.mse_loss(recon.float(), images.float())
        loss = c.w_sem * l_sem + c.w_rec * l_rec + q.loss
        logs = {"sem_cos": (1 - l_sem).detach(), "mse": l_rec.detach(), "vq": q.loss.detach(),
                "usage_batch": q.stats["usage"], "psnr": psnr(recon.detach(), images)}
        if c.w_lpips > 0:
            l_lp = self._lpips(recon.float(), images.float()).mean()
            loss = loss + c.w_lpips * l_lp
            logs["lpips"] = l_lp.detach()
        return loss, recon, logs

    def _lpips(self, a: Tensor, b: Tensor) -> Tensor:
        if not hasattr(self, "_lpips_net"):
            try:
                import lpips
            except ImportError as err:
                raise ImportError("w_lpips > 0 needs the 'lpips' package and its VGG weights; set w_lpips: 0 "
                                  "(the CPU recipes do) or install lpips on a connected machine") from err
            object.__setattr__(self, "_lpips_net", freeze(lpips.LPIPS(net="vgg")).to(a.device))
        return self._lpips_net(a, b)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.float().clamp(-1, 1) - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


# ------------------------------------------------------------------------------------------------
# Lightning wrapper
# ------------------------------------------------------------------------------------------------

class TokenFlowModule(LightningModule):
    """Trains :class:`TokenFlowTokenizer` with a PatchGAN (manual optimization: generator then discriminator).

    Both optimizers step on every batch, so Lightning's ``global_step`` (and ``trainer.max_steps``)
    counts 2 per batch; ``disc_start`` is in batches.

    Logs ``val/loss`` (L_sem + MSE + VQ), ``val/psnr``, ``val/teacher_cos``, ``val/usage`` and a
    reconstruction grid PNG under ``<log_dir>/samples``.
    """

    def __init__(self, preset: str = "tiny", overrides: dict[str, Any] | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), grad_clip: float = 1.0, num_sample_images: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = TokenFlowTokenizer(tokenflow_config(preset, **(overrides or {})))
        c = self.tokenizer.config
        self.discriminator = PatchDiscriminator(c.disc_channels, c.disc_layers)
        self._val: dict[str, list] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.teacher.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.tokenizer.encode(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        opt_g, opt_d = self.optimizers()
        c = self.tokenizer.config
        gan_on = self.global_step // 2 >= c.disc_start  # global_step counts both optimizers: 2 per batch
        loss, recon, logs = self.tokenizer.losses(images)
        if gan_on and c.w_gan > 0:
            g_loss = -self.discriminator(recon).mean()
            loss = loss + c.w_gan * g_loss
            logs["gan_g"] = g_loss.detach()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        if gan_on and c.w_gan > 0:
            d_loss = c.w_gan * 0.5 * (F.relu(1 - self.discriminator(images)).mean()
                                      + F.relu(1 + self.discriminator(recon.detach())).mean())
            self.manual_backward(d_loss)
            self.clip_gradients(opt_d, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            logs["gan_d"] = d_loss.detach()
        # stepped every batch (a no-op without gradients) so that trainer.global_step == 2 * batches always
        opt_d.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        for k, v in logs.items():
            self.log(f"train/{k}", v, batch_size=images.shape[0])

    def on_validation_epoch_start(self) -> None:
        self._val = {"ids": [], "images": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        loss, recon, logs = self.tokenizer.losses(images)
        n = images.shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/psnr", logs["psnr"], prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/teacher_cos", logs["sem_cos"], batch_size=n, sync_dist=True)
        self.log("val/mse", logs["mse"], batch_size=n, sync_dist=True)
        self._val["ids"].append(self.tokenizer.encode(images).cpu())
        if sum(x.shape[0] for x in self._val["images"]) < self.hparams.num_sample_images:
            self._val["images"].append(torch.stack([images, recon.to(images.dtype)], 1)[: self.hparams.num_sample_images].cpu())
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("ids"):
            return
        ids = torch.cat(self._val["ids"])
        self.log("val/usage", codebook_stats(ids, self.tokenizer.vocab_size)["usage"])
        if self._trainer is not None and self.trainer.is_global_zero and self._val["images"]:
            from tokenizers_img.seed import save_image_grid

            pairs = torch.cat(self._val["images"])[: self.hparams.num_sample_images]  # (n, 2, 3, H, W)
            root = self.trainer.log_dir or self.trainer.default_root_dir
            save_image_grid(pairs.flatten(0, 1), Path(root) / "samples" /
                            f"tokenflow_recon_step{self.global_step:06d}.png", nrow=8)

    def configure_optimizers(self):
        hp = self.hparams
        gen = [p for p in self.tokenizer.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(gen, lr=hp.lr, betas=tuple(hp.betas))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        return [opt_g, opt_d]


__all__ = [
    "TokenFlowConfig", "TokenFlowModule", "TokenFlowTokenizer", "TOKENFLOW_PRESETS", "per_half_normalize",
    "psnr", "shared_distance", "shared_index_lookup", "shared_index_lookup_ref", "tokenflow_config",
]
