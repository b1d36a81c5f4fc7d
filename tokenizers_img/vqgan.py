"""VQGAN tokenizer in the LlamaGen family.

Paper: Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
arXiv 2406.06525, Sec. 2.2 (image tokenizer); architecture after Esser et al., "Taming Transformers",
arXiv 2012.09841. Re-implemented from the fact sheet of
https://github.com/FoundationVision/LlamaGen/blob/main/tokenizer/tokenizer_image/vq_model.py

Shapes (VQ-16 at 256 px)::

    x (B, 3, 256, 256) --Encoder--> (B, z=256, 16, 16) --quant_conv 1x1--> z_e (B, 8, 16, 16)
    z_e --VectorQuantizer (l2-normalised, K=16384)--> z_q (B, 8, 16, 16), indices (B, 16, 16)
    z_q --post_quant_conv 1x1--> (B, 256, 16, 16) --Decoder--> x_hat (B, 3, 256, 256)

Encoder: conv_in 3->ch; per level ``num_res_blocks`` ResBlocks (GroupNorm(32, eps 1e-6), swish, conv3x3,
twice, 1x1 skip when channels change), single-head self-attention only in the last level, downsample
(pad (0,1,0,1) + conv3x3 stride 2) after every level but the last; mid Res-Attn-Res; GroupNorm, swish,
conv3x3 -> z_channels. Decoder mirrors it with ``num_res_blocks + 1`` ResBlocks per level and
nearest x2 upsample + conv3x3. VQ losses: ||z_q - sg z||^2 + beta ||sg z_q - z||^2 with beta = 0.25
(see :mod:`tokenizers_img.quantizers`). The GAN / perceptual losses live in :mod:`tokenizers_img.losses`.

Presets: ``tiny`` (CPU, 32 px -> 8x8 grid, K=512), ``VQ-16`` (paper, 72M parameters, /16, K=16384,
dim 8) and ``VQ-8`` (paper, ch_mult (1, 2, 2, 4), /8).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_img.base import ImageTokenizer, QuantizerOutput, config_from_dict
from tokenizers_img.quantizers import VectorQuantizer
from vision.layers import attention

__all__ = ["VQGANConfig", "VQGAN", "VQGAN_PRESETS", "Encoder", "Decoder", "attention_ref"]

# TIMM-style global switch for the fused attention path (reference path: ``attention_ref``).
FUSED_ATTN = os.environ.get("VTW_FUSED_ATTN", "1") != "0"


@dataclass
class VQGANConfig:
    image_size: int = 256  # training resolution; sets token_grid (other multiples of downsample work too)
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len-1 downsamples: 5 levels -> /16
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 (LlamaGen)
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8  # LlamaGen's low-dimensional code (8-d, l2-normalised)
    codebook_l2_norm: bool = True
    commit_beta: float = 0.25
    use_ema: bool = False
    restart_dead: bool = False  # not in LlamaGen; keeps usage high on tiny CPU runs
    dead_after: int = 50  # training forwards without a hit before a code is restarted
    attn_last_level: bool = True  # self-attention only at the lowest resolution (LlamaGen)
    mid_attn: bool = True
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if len(self.ch_mult) < 1:
            raise ValueError("ch_mult needs at least one level")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the downsample factor "
                             f"{self.downsample} (ch_mult {self.ch_mult})")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # CPU demo: 32x32 shapes -> 8x8 grid of K=512 l2-normalised 8-d codes; 2 downsamples.
    "tiny": VQGANConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                        codebook_size=512, codebook_embed_dim=8, restart_dead=True, dead_after=25,
                        norm_groups=16),
    # LlamaGen VQ-16 (about 72M parameters) and VQ-8.
    "VQ-16": VQGANConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQGANConfig(image_size=256, ch_mult=(1, 2, 2, 4)),
}


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


def attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference single-head attention. q, k, v (B, N, C) -> (B, N, C), softmax(q k^T / sqrt C) v."""
    w = torch.einsum("bnc,bmc->bnm", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, N, N)
    return torch.einsum("bnm,bmc->bnc", w.softmax(-1), v.float()).to(q.dtype)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj convs (taming / LlamaGen)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(ch, groups)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.fused_attn = FUSED_ATTN

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))  # (B, HW, C)
        if self.fused_attn:
            o = attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C); SDPA or eager bf16 CPU training
        else:
            o = attention_ref(q, k, v)
        o = o.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as taming / LlamaGen


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, in_ch, H, W) -> (B, z_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 groups: int = 32, attn_last_level: bool = True, mid_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            out_ch = ch * mult
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(in_ch, out_ch, groups, dropout))
                in_ch = out_ch
                if attn_last_level and i == len(ch_mult) - 1:
                    level.attn.append(AttnBlock(in_ch, groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(in_ch)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(in_ch, in_ch, groups, dropout),
                                  AttnBlock(in_ch, groups) if mid_attn else nn.Identity(),
                                  ResnetBlock(in_ch, in_ch, groups, dropout)])
        self.norm_out = _group_norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 groups: int = 32, attn_last_level: bool = True, mid_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(in_ch, in_ch, groups, dropout),
                                  AttnBlock(in_ch, groups) if mid_attn else nn.Identity(),
                                  ResnetBlock(in_ch, in_ch, groups, dropout)])
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(reversed(ch_mult)):
            level = nn.Module()
            out_ch = ch * mult
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.res.append(ResnetBlock(in_ch, out_ch, groups, dropout))
                in_ch = out_ch
                if attn_last_level and i == 0:
                    level.attn.append(AttnBlock(in_ch, groups))
            if i != len(ch_mult) - 1:
                level.upsample = Upsample(in_ch)
            self.conv_blocks.append(level)
        self.norm_out = _group_norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the last conv (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvAutoencoderTokenizer(ImageTokenizer):
    """Shared by the convolutional tokenizers (VQGAN, BAE): ``self.config`` has ``image_size`` and
    ``downsample``, ``self.decoder`` is a :class:`Decoder`; one token per ``downsample`` x ``downsample``
    pixel cell, raster order."""

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def token_grid(self) -> tuple[int, int]:
        g = self.config.image_size // self.downsample
        return (g, g)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.last_layer


class VQGAN(ConvAutoencoderTokenizer):
    """LlamaGen-style VQGAN tokenizer. ``VQGAN(VQGANConfig(...))`` or ``VQGAN.from_preset("tiny")``."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        config = config_from_dict(VQGANConfig, config, "VQGAN")
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.norm_groups,
                               c.attn_last_level, c.mid_attn, c.dropout)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.quantizer = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, beta=c.commit_beta,
                                         l2_norm=c.codebook_l2_norm, use_ema=c.use_ema,
                                         restart_dead=c.restart_dead, dead_after=c.dead_after)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)
        self.decoder = Decoder(c.in_channels, c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.norm_groups,
                               c.attn_last_level, c.mid_attn, c.dropout)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VQGAN:
        if name not in VQGAN_PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; known: {sorted(VQGAN_PRESETS)}")
        return cls(replace(VQGAN_PRESETS[name], **overrides))

    # ------------------------------------------------------------- interface properties
    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size


    # ------------------------------------------------------------- pipeline
    def encode_latents(self, images: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(images))  # (B, D, h, w)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)  # indices (B, h, w)

    def decode_latents(self, quantized: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def indices_to_quantized(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """tokens (B, h*w) raster order -> unit-norm codes (B, D, h, w)."""
        h, w = grid or self.token_grid
        if tokens.ndim != 2 or tokens.shape[1] != h * w:
            raise ValueError(f"expected tokens of shape (B, {h * w}) for grid {h}x{w}, got {tuple(tokens.shape)}")
        return self.quantizer.embed(tokens.long().view(-1, h, w))  # (B, D, h, w)

    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """tokens (B, h*w) -> images; ``grid`` decodes other sizes than the training ``token_grid``."""
        if grid is None:
            self.check_tokens(indices)
        return self.decode_latents(self.indices_to_quantized(indices, grid))

    def codebook_embeddings(self) -> Tensor:
        return self.quantizer.get_codebook().detach()  # (K, D), unit norm when l2
