"""The workbench's evaluation classifier: a small timm Vision Transformer on the shapes data.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (arXiv:2010.11929). The network is timm's ``VisionTransformer`` (pre-norm blocks,
class token, learned position embeddings); this file only fixes small presets, a training
wrapper and a safetensors save/load pair.

The trained classifier has three jobs in the workbench: it scores generated images (class
consistency and a Frechet distance in its pre-logit feature space), and it is the ViT that token
merging (ToMe/PiToMe) compresses.

Images are float tensors in [-1, 1], shape (B, 3, H, W). Features are
``net.forward_head(net.forward_features(x), pre_logits=True)``, shape (B, embed_dim).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from vision.towers import load_state_dict_checked


@dataclass
class ClassifierConfig:
    num_classes: int = 30
    image_size: int = 32
    patch_size: int = 4  # 32x32 images -> an 8x8 grid of 64 patch tokens
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    # "patch": timm's linear patch embedding; "conv": a small convolutional stem with the same total
    # stride (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021). On the
    # small shapes data a plain-patch ViT learns colour at once but shape only very slowly; the conv
    # stem fixes that at the same token count, and the blocks stay timm's (token merging is unchanged).
    stem: str = "patch"
    stem_width: int = 128  # channels of the conv stem at the token resolution
    global_pool: str = "token"  # "token" (CLS) or "avg" (mean of patch tokens, translation-invariant)


# Named size presets; a YAML recipe picks one by name and may override single fields.
CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: a conv stem to an 8x8 token grid, then one pre-norm block of width 128, mean-pooled tokens.
    # Measured with the demo recipe on 2 CPU cores (120 s of bf16 training): this preset reached 100%
    # validation accuracy with seeds 0 and 1 (~1130 steps); 4 blocks reached 64% and 2 blocks 80-98%
    # depending on the seed in the same time: on these data the conv stem carries the shape features and
    # every further block mostly costs steps.
    "tiny": dict(patch_size=4, embed_dim=128, depth=1, num_heads=4, stem="conv", stem_width=128, global_pool="avg"),
    # CPU recipe for the token-merging benchmark: twelve blocks (merging compounds over depth, as in DeiT's
    # 12) of width 128 behind a light conv stem (5% of the FLOPs), 2.5 M parameters.
    "deep": dict(patch_size=4, embed_dim=128, depth=12, num_heads=4, stem="conv", stem_width=64, global_pool="avg"),
    "small": dict(patch_size=4, embed_dim=384, depth=12, num_heads=6),  # ViT-S shape, ~21M params
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),  # ViT-B/16 for 224px data
}


def classifier_config(preset: str = "tiny", **overrides: Any) -> ClassifierConfig:
    if preset not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; choose one of {sorted(CLASSIFIER_PRESETS)}")
    values = {**CLASSIFIER_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return ClassifierConfig(**values)


def _conv_stem_embed(stem_width: int):
    """An ``embed_layer`` for timm's VisionTransformer: 3x3 convolutions (stride 2 until the total stride
    equals ``patch_size``), then timm's ``HybridEmbed`` projects the feature map to ``embed_dim`` tokens."""
    from timm.layers import HybridEmbed

    def make(img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True, **kwargs: Any):
        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

        levels = max(patch_size.bit_length() - 1, 0)  # number of stride-2 stages: log2(patch_size)
        width = max(stem_width >> levels, 16)
        layers: list[nn.Module] = conv(in_chans, width)
        for level in range(levels):  # each stage halves the resolution, then refines at that resolution
            out = stem_width >> (levels - level - 1)
            layers += conv(width, out, stride=2) + conv(out, out)
            width = out
        backbone = nn.Sequential(*layers)  # (B, 3, H, W) -> (B, stem_width, H/patch, W/patch)
        backbone.num_features = width  # what HybridEmbed reads when feature_size is given
        return HybridEmbed(backbone, img_size=img_size, patch_size=1, feature_size=img_size // patch_size,
                           in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                           dynamic_img_pad=kwargs.get("dynamic_img_pad", False))

    return make


def build_vit(config: ClassifierConfig) -> nn.Module:
    """A timm ``VisionTransformer`` for ``config`` (random weights)."""
    from timm.models.vision_transformer import VisionTransformer

    if config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    if config.stem not in ("patch", "conv"):
        raise ValueError(f"unknown stem {config.stem!r}; choose 'patch' or 'conv'")
    if config.stem == "conv" and config.patch_size & (config.patch_size - 1):
        raise ValueError(f"the conv stem needs a power-of-two patch_size, got {config.patch_size}")
    extra = {"embed_layer": _conv_stem_embed(config.stem_width)} if config.stem == "conv" else {}
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=config.drop_path_rate,
        class_token=True,
        global_pool=config.global_pool,
        **extra,
    )


def classifier_features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logit features (B, embed_dim) of images in [-1, 1]."""
    return net.forward_head(net.forward_features(images), pre_logits=True)


class ImageClassifier(pl.LightningModule):
    """Thin Lightning wrapper: cross-entropy training of :func:`build_vit` on dict batches
    ``{"image": (B,3,H,W) in [-1,1], "label": (B,)}``. Logs ``{stage}/loss`` and ``{stage}/acc``."""

    def __init__(
        self,
        num_classes: int = 30,
        image_size: int = 32,
        preset: str = "tiny",
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        stem_width: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        label_smoothing: float = 0.1,
        class_names: list[str] | None = None,
        time_budget_s: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = classifier_config(preset, num_classes=num_classes, image_size=image_size,
                                        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                        stem_width=stem_width)
        self.net = build_vit(self.config)
        self.class_names = class_names
        self._fit_started: float | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"],
                               label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        batch_size = len(batch["label"])  # dict batches also hold caption lists: say the size explicitly
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=batch_size)
        self.log(f"{stage}/acc", acc, prog_bar=True, sync_dist=stage != "train", batch_size=batch_size)
        return loss

    def on_train_start(self) -> None:
        self._fit_started = time.monotonic()
        # bf16/fp16 training on CPU: timm's eager attention (q k^T, softmax, @ v) is ~1.5x faster per step than
        # SDPA's flash kernel there (benchmarks/bench_cpu_attention.py); inference keeps timm's default
        if self.device.type == "cpu" and str(self.trainer.precision).startswith(("bf16", "16")):
            self._timm_fused = {m: m.fused_attn for m in self.net.modules() if hasattr(m, "fused_attn")}
            for m in self._timm_fused:
                m.fused_attn = False

    def on_train_end(self) -> None:
        for m, fused in getattr(self, "_timm_fused", {}).items():
            m.fused_attn = fused
        self._timm_fused = {}

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self.net(batch["image"]).argmax(-1)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.999),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 2)
        budget = self.hparams.time_budget_s

        def factor(step: int) -> float:
            # with a wall-clock budget (trainer max_time), the cosine follows whichever of steps and
            # time is further along, so a slow machine still ends its run at the low learning rate
            if budget and self._fit_started is not None and step >= warmup:
                elapsed_fraction = (time.monotonic() - self._fit_started) / budget
                step = max(step, warmup + int(elapsed_fraction * (total - warmup)))
            return warmup_cosine(step, warmup, total)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    """Linear warmup to 1, then cosine decay to ``floor`` at ``total`` steps (a LambdaLR factor)."""
    import math

    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def save_classifier(net: nn.Module, config: ClassifierConfig, class_names: list[str] | None,
                    directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (atomically per file)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, directory / "model.safetensors")
    meta = {"kind": "vtw-classifier", "config": asdict(config), "class_names": class_names}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(meta, handle, indent=2)
    os.replace(tmp, directory / "config.json")
    return directory


def load_classifier(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier saved by :func:`save_classifier` (a directory) or a Lightning ``.ckpt`` of
    :class:`ImageClassifier`. Returns ``(net, info)`` with ``net`` in eval mode and ``info`` holding
    ``config`` (dict), ``class_names`` and ``image_size``."""
    path = Path(path)
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        for needed in (config_file, weights_file):
            if not needed.is_file():
                raise FileNotFoundError(f"classifier directory {path} has no {needed.name}")
        meta = json.loads(config_file.read_text())
        if meta.get("kind") != "vtw-classifier":
            raise ValueError(f"{config_file} is not a workbench classifier config (kind={meta.get('kind')!r})")
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
        config_dict, class_names = meta["config"], meta.get("class_names")
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hparams = checkpoint.get("hyper_parameters", {})
        if "state_dict" not in checkpoint or not any(k.startswith("net.") for k in checkpoint["state_dict"]):
            raise ValueError(f"{path} is not a checkpoint of vision.classifier.ImageClassifier")
        config = classifier_config(hparams.get("preset", "tiny"), **{f.name: hparams.get(f.name) for f in fields(ClassifierConfig)})
        config_dict, class_names = asdict(config), hparams.get("class_names")
        state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    else:
        raise FileNotFoundError(f"classifier path {path} does not exist")
    config = ClassifierConfig(**{f.name: config_dict[f.name] for f in fields(ClassifierConfig) if f.name in config_dict})
    net = build_vit(config)
    load_state_dict_checked(net, state, str(path))
    net.eval()
    return net, {"config": asdict(config), "class_names": class_names, "image_size": config.image_size}
