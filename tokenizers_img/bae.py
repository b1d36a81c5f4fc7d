"""ELM's binary autoencoder (BAE) tokenizer.

Paper: Liu et al., "Elucidating the Design Space of Language Models for Image Generation",
arXiv 2410.16257 (binary autoencoder, Sec. 3; token splits t-c, Sec. 4). Re-implemented from the fact
sheet of https://github.com/Pepper-lll/LMforImageGeneration/blob/main/bae/binaryae.py

Shapes (released BAE at 256 px, K bits)::

    x (B, 3, 256, 256) --Encoder (nf 128, ch_mult (1,1,2,2,4))--> (B, 256, 16, 16)
      --proj Conv1x1(256 -> K)--> logits (B, K, 16, 16)
      --BinaryQuantizer: p = sigmoid(logits); b = 1[p > 0.5] or Bernoulli(p); b_st = b + p - sg p
      --embed: z_q = einsum("bkhw,kd->bdhw", b_st, E (K, 256))  (a linear map of the bit vector)
      --(norm_first GroupNorm)--> Decoder --> x_hat (B, 3, 256, 256)

Tokens: bits (B, K, h, w) -> (B, h*w, K) -> ``token_each`` chunks of ``code_dim`` bits, each read as an
integer most significant bit first: ``encode`` returns (B, h*w, token_each) in [0, 2^code_dim).
Splits "t-c": 1-16, 2-8 (16 bits), 2-10 (20 bits), 2-12 (24 bits); K = token_each * code_dim.

Deviations: images are in [-1, 1] like every workbench tokenizer (ELM feeds [0, 1]); in ``eval()`` the
bits are thresholded (reproducible tokens), Bernoulli sampling in ``train()`` as ELM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tokenizers_img.base import QuantizerOutput, config_from_dict
from tokenizers_img.quantizers import (
    BinaryQuantizer,
    bits_to_subtokens,
    subtoken_bit_table,
    subtokens_to_bits,
)
from tokenizers_img.vqgan import ConvAutoencoderTokenizer, Decoder, Encoder, _group_norm

__all__ = ["BAEConfig", "BinaryAutoencoder", "BAE_PRESETS", "BAE_SPLITS"]

# ELM's named token splits: "t-c" -> (token_each, code_dim)
BAE_SPLITS: dict[str, tuple[int, int]] = {"1-16": (1, 16), "2-8": (2, 8), "2-10": (2, 10), "2-12": (2, 12)}


@dataclass
class BAEConfig:
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128  # ELM nf
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    emb_dim: int = 256  # encoder output / bit-embedding width
    token_each: int = 1  # sub-tokens per position
    code_dim: int = 16  # bits per sub-token; num_bits = token_each * code_dim
    deterministic: bool = False  # threshold bits in training too (ELM's "deterministic" BAE)
    code_weight: float = 0.0  # bit-confidence loss mean(p(1-p)); 0 in ELM's defaults
    norm_first: bool = True  # GroupNorm on the decoder input (used by every ELM script)
    attn_last_level: bool = True  # ELM: attention at resolution 16 = the last level at 256 px
    mid_attn: bool = True
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {self.downsample}")
        if not (1 <= self.code_dim <= 24 and self.token_each >= 1):
            raise ValueError(f"bad split token_each={self.token_each}, code_dim={self.code_dim}")

    @property
    def num_bits(self) -> int:
        return self.token_each * self.code_dim

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


BAE_PRESETS: dict[str, BAEConfig] = {
    # CPU demo: 32 px -> 8x8 grid of 16 bits, read as two 8-bit sub-tokens (vocab 256 each). Thresholded
    # bits in training (ELM's deterministic BAE): with the demo recipe (3 min, 2 CPU cores) this reached
    # 26.9 dB validation PSNR, Bernoulli bits 20.2 dB (the decoder cannot learn through the bit noise in
    # so few steps).
    "tiny": BAEConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, emb_dim=64, token_each=2,
                      code_dim=8, norm_groups=16, deterministic=True),
    # Released ELM BAEs (256 px, /16): 16, 20 and 24 bits; override token_each/code_dim for other splits.
    "bae-16": BAEConfig(token_each=1, code_dim=16),
    "bae-20": BAEConfig(token_each=2, code_dim=10),
    "bae-24": BAEConfig(token_each=2, code_dim=12),
}


class BinaryAutoencoder(ConvAutoencoderTokenizer):
    """ELM BAE. ``BinaryAutoencoder.from_preset("tiny", split="2-8")``."""

    def __init__(self, config: BAEConfig) -> None:
        super().__init__()
        config = config_from_dict(BAEConfig, config, "BinaryAutoencoder")
        self.config = c = config
        self.encoder = Encoder(c.in_channels, c.ch, c.ch_mult, c.num_res_blocks, c.emb_dim, c.norm_groups,
                               c.attn_last_level, c.mid_attn, c.dropout)
        self.proj = nn.Conv2d(c.emb_dim, c.num_bits, 1)  # -> bit logits
        self.quantizer = BinaryQuantizer(c.num_bits, deterministic=c.deterministic, code_weight=c.code_weight)
        self.embed = nn.Parameter(torch.randn(c.num_bits, c.emb_dim) / c.num_bits**0.5)  # E (K, emb_dim)
        self.norm_in = _group_norm(c.emb_dim, c.norm_groups) if c.norm_first else nn.Identity()
        self.decoder = Decoder(c.in_channels, c.ch, c.ch_mult, c.num_res_blocks, c.emb_dim, c.norm_groups,
                               c.attn_last_level, c.mid_attn, c.dropout)

    @classmethod
    def from_preset(cls, name: str, split: str | None = None, **overrides) -> BinaryAutoencoder:
        if name not in BAE_PRESETS:
            raise ValueError(f"unknown BAE preset {name!r}; known: {sorted(BAE_PRESETS)}")
        if split is not None:
            if split not in BAE_SPLITS:
                raise ValueError(f"unknown split {split!r}; known: {sorted(BAE_SPLITS)}")
            overrides["token_each"], overrides["code_dim"] = BAE_SPLITS[split]
        return cls(replace(BAE_PRESETS[name], **overrides))

    # ------------------------------------------------------------- interface properties
    @property
    def vocab_size(self) -> int:
        return 2**self.config.code_dim

    @property
    def token_each(self) -> int:
        return self.config.token_each


    # ------------------------------------------------------------- pipeline
    def encode_latents(self, images: Tensor) -> Tensor:
        return self.proj(self.encoder(images))  # bit logits (B, K, h, w)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)  # quantized b_st (B, K, h, w), indices = bits (B, K, h, w)

    def decode_latents(self, quantized: Tensor) -> Tensor:
        z = torch.einsum("bkhw,kd->bdhw", quantized, self.embed.to(quantized.dtype))  # (B, emb_dim, h, w)
        return self.decoder(self.norm_in(z))

    def tokens_from_indices(self, indices: Tensor) -> Tensor:
        bits = indices.flatten(2).transpose(1, 2)  # (B, h*w, K)
        tokens = bits_to_subtokens(bits, self.config.token_each, self.config.code_dim)  # (B, h*w, t)
        return tokens[..., 0] if self.config.token_each == 1 else tokens  # (B, h*w) for split 1-16

    def indices_to_quantized(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """tokens (B, h*w, token_each) (or (B, h*w) when token_each == 1) -> bits (B, K, h, w) as floats."""
        h, w = grid or self.token_grid
        if self.config.token_each == 1 and tokens.ndim == 2:
            tokens = tokens[..., None]  # (B, h*w, 1)
        if tokens.ndim != 3 or tokens.shape[1:] != (h * w, self.config.token_each):
            raise ValueError(f"expected tokens (B, {h * w}, {self.config.token_each}), got {tuple(tokens.shape)}")
        bits = subtokens_to_bits(tokens, self.config.code_dim)  # (B, h*w, K)
        return bits.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def codebook_embeddings(self) -> Tensor:
        """(2^code_dim, code_dim): the bits of every sub-token id, MSB first (its latent is its bit vector)."""
        return subtoken_bit_table(self.config.code_dim, device=self.embed.device)
