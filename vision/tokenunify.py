"""TokenUnify: mixture token prediction pretraining of a SegMamba-style 3D U-Net on EM volumes.

Paper: Chen et al., "TokenUnify: Scaling Up Autoregressive Pretraining for Neuron Segmentation"
(arXiv 2405.16847, v1 "Scalable Autoregressive Visual Pre-training with Mixture Token Prediction").
Network after SegMamba (Xing et al., arXiv 2401.13560) as used by TokenUnify's released code. Facts
from ``shared/methods/unify_compress.md`` section 1; code written from those facts, none copied.

Tokens (section 1.2): a (Z, Y, X) crop is cut into non-overlapping (tz, ty, tx) patches (paper 4x16x16 of a
16x160x160 crop = 400 tokens) in z-major raster order (einops ``(z y x) tz ty tx``), volumes min-max
normalised. With x the clean crop, x~ the corrupted input, f the network (sigmoid output) and P the
next-token head, the objectives (section 1.3) are

- random-token:   mask a fraction r of tokens (fill 0 or N(0,1));  L = MSE(sigma(f(x~)), x) over the volume
                  (TokenUnify), or over the masked tokens only (``masked_only``, as MAE);
- next-all-token: keep tokens t_0..t_{n-1} (n ~ U{1..K-1}), fill the rest; L = MSE(sigma(f(x~)), x);
- next-token:     same x~;  L = MSE(sigma(P(f_logits(x~))), t_n), P sized from the crop/token config.

Mixture (section 1.4): ``sequential`` stages (paper: random-token stage, then next-all + next-token joint),
or ``mix`` with per-batch sampling by weights. Unlike the released code, every objective's loss is logged,
the alternation is driven by the real global step, and weight loading reports what loaded (zero keys fails).

Shapes for the tiny preset on a (B, 1, 16, 80, 80) crop: stem /2 -> (8, 40, 40), stages -> (4, 20, 20),
(2, 10, 10), (1, 5, 5); Mamba sequence lengths 12800, 1600, 200, 25; decoder back to (16, 80, 80).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.mamba import MambaLayer

__all__ = ["SegMambaConfig", "SegMamba", "MambaEncoder", "NextTokenHead", "TokenUnifyConfig", "TokenUnifyModel",
           "patchify", "unpatchify", "random_token_corruption", "next_all_corruption", "next_token_target",
           "minmax_normalize", "PRESETS", "segmamba_config", "OBJECTIVES"]

OBJECTIVES = ("random", "next_all", "next")


# ----------------------------------------------------------------------------------------------------------
# Tokens and corruptions
# ----------------------------------------------------------------------------------------------------------
def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-volume min-max normalisation (x - min) / (max - min + 1e-8) over all but the batch dim."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - lo.view(shape)) / (hi - lo + 1e-8).view(shape)


def _grid(shape: tuple[int, ...], token: tuple[int, int, int]) -> tuple[int, int, int]:
    z, y, x = shape[-3:]
    tz, ty, tx = token
    if z % tz or y % ty or x % tx:
        raise ValueError(f"crop {tuple(shape[-3:])} is not divisible by the token size {token}")
    return z // tz, y // ty, x // tx


def patchify(x: torch.Tensor, token: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, Z, Y, X) -> (B, K, C*tz*ty*tx) tokens in z-major raster order (K = nz*ny*nx)."""
    b, c = x.shape[:2]
    nz, ny, nx = _grid(x.shape, token)
    tz, ty, tx = token
    x = x.reshape(b, c, nz, tz, ny, ty, nx, tx)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, nz * ny * nx, c * tz * ty * tx)


def unpatchify(tokens: torch.Tensor, token: tuple[int, int, int], shape: tuple[int, int, int],
               channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, K, C*tz*ty*tx) -> (B, C, Z, Y, X)."""
    b = tokens.shape[0]
    nz, ny, nx = _grid(shape, token)
    tz, ty, tx = token
    x = tokens.reshape(b, nz, ny, nx, channels, tz, ty, tx)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, channels, nz * tz, ny * ty, nx * tx)


def _fill(like: torch.Tensor, fill: str, generator: torch.Generator | None) -> torch.Tensor:
    if fill == "zero":
        return torch.zeros_like(like)
    if fill == "noise":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    raise ValueError(f"fill must be 'zero' or 'noise', got {fill!r}")


def random_token_corruption(x: torch.Tensor, token: tuple[int, int, int], mask_ratio: float | None = 0.4,
                            ratio_range: tuple[float, float] = (0.2, 0.8), fill: str = "noise",
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random subset of tokens per sample. ``mask_ratio=None`` draws it from U(ratio_range) per sample
    (the released code's rule for any value other than 0.4). Returns (x~, mask (B, K) bool)."""
    tok = patchify(x, token)  # (B, K, V)
    b, k, _ = tok.shape
    if mask_ratio is None:
        ratios = torch.empty(b).uniform_(*ratio_range, generator=generator)
    else:
        ratios = torch.full((b,), float(mask_ratio))
    n_mask = (ratios * k).round().long().clamp(0, k)
    order = torch.rand(b, k, generator=generator).argsort(1)  # uniform without replacement
    mask = order < n_mask[:, None]  # the n_mask tokens of lowest random rank
    mask = mask.to(x.device)
    tok = torch.where(mask[..., None], _fill(tok, fill, generator), tok)
    return unpatchify(tok, token, tuple(x.shape[-3:]), x.shape[1]), mask


def next_all_corruption(x: torch.Tensor, token: tuple[int, int, int], fill: str = "zero",
                        generator: torch.Generator | None = None, prefix: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random prefix t_0..t_{n-1} (n ~ U{1..K-1} per sample, or ``prefix``) and fill the rest.

    Returns (x~, n (B,) long)."""
    tok = patchify(x, token)
    b, k, _ = tok.shape
    if k < 2:
        raise ValueError(f"next-token objectives need at least 2 tokens per crop, got {k}")
    n = torch.randint(1, k, (b,), generator=generator) if prefix is None else prefix.long().cpu()
    keep = (torch.arange(k)[None] < n[:, None]).to(x.device)  # (B, K)
    tok = torch.where(keep[..., None], tok, _fill(tok, fill, generator))
    return unpatchify(tok, token, tuple(x.shape[-3:]), x.shape[1]), n


def next_token_target(x: torch.Tensor, n: torch.Tensor, token: tuple[int, int, int]) -> torch.Tensor:
    """Token t_n of each sample: (B, C, tz, ty, tx)."""
    tok = patchify(x, token)  # (B, K, C*V)
    picked = tok[torch.arange(tok.shape[0], device=tok.device), n.to(tok.device)]  # (B, C*V)
    return picked.view(x.shape[0], x.shape[1], *token)


# ----------------------------------------------------------------------------------------------------------
# SegMamba-style 3D U-Net
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SegMambaConfig:
    in_chans: int = 1
    out_chans: int = 1  # 1 for pretraining reconstruction, 3 for affinities
    feat_size: tuple[int, ...] = (8, 16, 32, 64)
    hidden_size: int = 128
    depths: tuple[int, ...] = (1, 1, 1, 1)
    d_state: int = 16
    directions: tuple[str, ...] = ("fwd", "bwd", "slice")  # TokenUnify's "v3"
    nslices: int = 5
    stem_kernel: tuple[int, int, int] = (1, 7, 7)  # TokenUnify stem; stride 2 in z too, as in the code
    decoder_kernel: tuple[int, int, int] = (1, 3, 3)
    scan_mode: str | None = None


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(feat_size=(8, 16, 32, 64), hidden_size=128, depths=(1, 1, 1, 1)),
    "small_cpu": dict(feat_size=(16, 32, 64, 128), hidden_size=256, depths=(1, 1, 2, 2)),
    "base": dict(feat_size=(32, 64, 128, 256), hidden_size=512, depths=(2, 2, 2, 2)),  # paper 28.3M
    "small": dict(feat_size=(64, 128, 256, 512), hidden_size=1024, depths=(2, 2, 2, 2)),  # 112.5M
    "mid": dict(feat_size=(96, 192, 384, 768), hidden_size=1024, depths=(2, 2, 2, 2)),  # 206.6M
    "large": dict(feat_size=(144, 288, 576, 1104), hidden_size=2048, depths=(2, 2, 2, 2)),  # 506.6M
    "huge": dict(feat_size=(192, 384, 768, 1536), hidden_size=3072, depths=(2, 2, 2, 2)),  # 1008.9M
}


def segmamba_config(preset: str = "tiny", **overrides: Any) -> SegMambaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown SegMamba preset {preset!r}; choose from {sorted(PRESETS)}")
    return SegMambaConfig(**{**PRESETS[preset], **overrides})


class GSC(nn.Module):
    """Gated spatial convolution block: two 3x3x3 conv-IN-ReLU in series + a parallel 1x1x1 conv-IN-ReLU,
    summed, then 1x1x1 conv-IN-ReLU, plus a residual."""

    def __init__(self, c: int):
        super().__init__()
        cbr = lambda k: nn.Sequential(nn.Conv3d(c, c, k, padding=k // 2), nn.InstanceNorm3d(c), nn.ReLU())
        self.proj1, self.proj2, self.proj3, self.proj4 = cbr(3), cbr(3), cbr(1), cbr(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj4(self.proj2(self.proj1(x)) + self.proj3(x)) + x


class MlpChannel(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv3d(c, 2 * c, 1), nn.GELU(), nn.Conv3d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MambaEncoder(nn.Module):
    """Stem + 4 stages of (GSC, Mamba layers); outputs the 4 stage features (after IN + MlpChannel)."""

    def __init__(self, cfg: SegMambaConfig):
        super().__init__()
        f = cfg.feat_size
        pad = tuple(k // 2 for k in cfg.stem_kernel)
        self.downsample_layers = nn.ModuleList([nn.Conv3d(cfg.in_chans, f[0], cfg.stem_kernel, stride=2, padding=pad)])
        for i in range(len(f) - 1):
            self.downsample_layers.append(nn.Sequential(nn.InstanceNorm3d(f[i]),
                                                        nn.Conv3d(f[i], f[i + 1], (1, 2, 2), stride=2)))
        self.gscs = nn.ModuleList([GSC(c) for c in f])
        self.stages = nn.ModuleList([
            nn.Sequential(*[MambaLayer(c, d_state=cfg.d_state, directions=cfg.directions, nslices=cfg.nslices,
                                       scan_mode=cfg.scan_mode) for _ in range(d)])
            for c, d in zip(f, cfg.depths)])
        self.norms = nn.ModuleList([nn.InstanceNorm3d(c) for c in f])
        self.mlps = nn.ModuleList([MlpChannel(c) for c in f])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, gsc, stage, norm, mlp in zip(self.downsample_layers, self.gscs, self.stages, self.norms, self.mlps):
            x = stage(gsc(down(x)))  # (B, C_i, D_i, H_i, W_i)
            outs.append(mlp(norm(x)))
        return outs


class SegMamba(nn.Module):
    """Mamba encoder + UNETR-style convolutional decoder (MONAI blocks); returns logits (B, out, Z, Y, X).

    The crop must be divisible by 16 in every dimension (four stride-2 levels)."""

    def __init__(self, cfg: SegMambaConfig | None = None, **kwargs: Any):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        cfg = cfg or SegMambaConfig(**kwargs)
        self.cfg = cfg
        f, k = cfg.feat_size, cfg.decoder_kernel
        basic = lambda i, o: UnetrBasicBlock(3, i, o, kernel_size=k, stride=1, norm_name="instance", res_block=True)
        up = lambda i, o: UnetrUpBlock(3, i, o, kernel_size=k, upsample_kernel_size=2, norm_name="instance",
                                       res_block=True)
        self.vit = MambaEncoder(cfg)  # name kept from TokenUnify checkpoints ("vit.*")
        self.encoder1 = basic(cfg.in_chans, f[0])  # full resolution
        self.encoder2 = basic(f[0], f[0])  # /2
        self.encoder3 = basic(f[1], f[1])  # /4
        self.encoder4 = basic(f[2], f[2])  # /8
        self.encoder5 = basic(f[3], cfg.hidden_size)  # /16
        self.decoder4 = up(cfg.hidden_size, f[2])  # /16 -> /8
        self.decoder3 = up(f[2], f[1])  # -> /4
        self.decoder2 = up(f[1], f[0])  # -> /2
        self.decoder1 = up(f[0], f[0])  # -> /1
        self.out = UnetOutBlock(3, f[0], cfg.out_chans)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        for s in x.shape[-3:]:
            if s % 16:
                raise ValueError(f"SegMamba input {tuple(x.shape[-3:])} must be divisible by 16 in every dim")
        return self.vit(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_features(x)
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(outs[0]), self.encoder3(outs[1]), self.encoder4(outs[2])
        dec = self.encoder5(outs[3])
        dec = self.decoder4(dec, enc4)
        dec = self.decoder3(dec, enc3)
        dec = self.decoder2(dec, enc2)
        dec = self.decoder1(dec, enc1)
        return self.out(dec)  # logits (B, out_chans, Z, Y, X)


class NextTokenHead(nn.Module):
    """TokenUnify's next-token head P ("Preciever"): three stride-2 3D convs then Linear to one token.

    Sized from the crop and token shapes (the released code hard-codes 16x160x160 / 4x16x16)."""

    def __init__(self, crop: tuple[int, int, int], token: tuple[int, int, int], width: int = 12, channels: int = 1):
        super().__init__()
        self.token, self.channels = tuple(token), channels
        self.convs = nn.Sequential(
            nn.Conv3d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv3d(width, 1, 3, stride=2, padding=1))
        reduced = [s for s in crop]
        for _ in range(3):
            reduced = [(s + 2 - 3) // 2 + 1 for s in reduced]
        self.fc = nn.Linear(int(math.prod(reduced)), channels * int(math.prod(token)))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) logits of f -> (B, C, tz, ty, tx) logits of the next token."""
        h = self.convs(logits).flatten(1)
        return self.fc(h).view(logits.shape[0], self.channels, *self.token)


# ----------------------------------------------------------------------------------------------------------
# TokenUnify pretraining model
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TokenUnifyConfig:
    preset: str = "tiny"
    crop: tuple[int, int, int] = (16, 80, 80)
    token: tuple[int, int, int] = (4, 16, 16)  # paper: 4x16x16 tokens
    mask_ratio: float | None = 0.4  # None -> U(0.2, 0.8) per sample (released-code rule)
    random_fill: str = "noise"  # released run script: fill_mode=1 (N(0,1))
    next_fill: str = "zero"
    masked_only: bool = False  # True scores only masked tokens (MAE); TokenUnify scores the whole volume
    next_all_after_prefix_only: bool = False
    head_width: int = 12
    model_overrides: dict[str, Any] = field(default_factory=dict)


class PretrainOutput(NamedTuple):
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]  # per objective


class TokenUnifyModel(nn.Module):
    """SegMamba (1 output channel) + next-token head; computes any subset of the three objectives."""

    def __init__(self, cfg: TokenUnifyConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or TokenUnifyConfig(**kwargs)
        self.cfg = cfg
        _grid(cfg.crop, cfg.token)
        self.net = SegMamba(segmamba_config(cfg.preset, out_chans=1, **cfg.model_overrides))
        self.next_head = NextTokenHead(cfg.crop, cfg.token, cfg.head_width)

    def reconstruction_loss(self, pred: torch.Tensor, x: torch.Tensor, token_weight: torch.Tensor | None) -> torch.Tensor:
        """MSE over the volume, or over the tokens with weight 1 in ``token_weight`` (B, K)."""
        if token_weight is None:
            return F.mse_loss(pred, x)
        err = patchify((pred - x) ** 2, self.cfg.token).mean(-1)  # (B, K)
        w = token_weight.float()
        return (err * w).sum() / w.sum().clamp_min(1.0)

    def forward(self, x: torch.Tensor, objectives: tuple[str, ...] = OBJECTIVES,
                generator: torch.Generator | None = None) -> PretrainOutput:
        """x: clean normalised crops (B, 1, Z, Y, X). ``next_all`` and ``next`` share one corrupted input."""
        cfg = self.cfg
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad or not objectives:
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {objectives}")
        if tuple(x.shape[-3:]) != tuple(cfg.crop):
            raise ValueError(f"input crop {tuple(x.shape[-3:])} != configured crop {tuple(cfg.crop)}")
        losses: dict[str, torch.Tensor] = {}
        if "random" in objectives:
            xt, mask = random_token_corruption(x, cfg.token, cfg.mask_ratio, fill=cfg.random_fill, generator=generator)
            pred = torch.sigmoid(self.net(xt))
            losses["random"] = self.reconstruction_loss(pred, x, mask if cfg.masked_only else None)
        if "next_all" in objectives or "next" in objectives:
            xt, n = next_all_corruption(x, cfg.token, fill=cfg.next_fill, generator=generator)
            logits = self.net(xt)
            if "next_all" in objectives:
                k = patchify(x[:, :1, :, :, :], cfg.token).shape[1]
                after = (torch.arange(k)[None] >= n[:, None]).to(x.device) if cfg.next_all_after_prefix_only else None
                losses["next_all"] = self.reconstruction_loss(torch.sigmoid(logits), x, after)
            if "next" in objectives:
                target = next_token_target(x, n, cfg.token)
                losses["next"] = F.mse_loss(torch.sigmoid(self.next_head(logits)), target)
        total = sum(losses.values())
        return PretrainOutput(total, losses)


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The SegMamba weights of a pretraining model (keys relative to SegMamba, e.g. ``vit.*``)."""
    net = model.net if isinstance(model, TokenUnifyModel) else model
    return {k: v for k, v in net.state_dict().items()}


def config_dict(cfg: TokenUnifyConfig) -> dict[str, Any]:
    return asdict(cfg)
