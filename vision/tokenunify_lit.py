"""Lightning wrappers for TokenUnify pretraining and affinity fine-tuning (thin; models in vision.tokenunify).

Schedules of the pretraining objectives (``schedule``):

- ``"sequential"``: ``stages`` is a list of ``{"objectives": [...], "steps": N}`` run in order by the real
  global step (paper: random-token stage, then next-all + next-token joint). The last stage runs on.
- ``"mix"``: each batch draws one objective with probabilities ``weights`` (``{"random": 1, ...}``), or with
  ``mix_mode="sum"`` every batch sums all objectives with those weights.
Each objective's loss is logged as ``train/loss_<objective>``; ``val/loss`` sums all three objectives on
fixed validation crops (same metric for every arm).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch import LightningModule

from vision.em_segmentation import (
    load_checkpoint_state,
    load_matching_weights,
    seg_to_affinity,
    weighted_mse,
    widen_border,
)
from vision.tokenunify import OBJECTIVES, SegMamba, TokenUnifyConfig, TokenUnifyModel, segmamba_config


def _adamw(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("A_log", "A_b_log", "A_s_log", ".D", "D_b", "D_s")) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _cosine(opt: torch.optim.Optimizer, total: int, warmup: int) -> dict[str, Any]:
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, f), "interval": "step"}


class TokenUnifyPretrainLit(LightningModule):
    def __init__(self, preset: str = "tiny", crop: tuple[int, int, int] = (16, 80, 80),
                 token: tuple[int, int, int] = (4, 16, 16), mask_ratio: float | None = 0.4, random_fill: str = "noise",
                 next_fill: str = "zero", masked_only: bool = False, schedule: str = "sequential",
                 stages: list[dict[str, Any]] | None = None, weights: dict[str, float] | None = None,
                 mix_mode: str = "sample", lr: float = 6.25e-4, weight_decay: float = 0.05, warmup_steps: int = 0,
                 total_steps: int = 1000, seed: int = 0, model_overrides: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        if schedule not in ("sequential", "mix"):
            raise ValueError(f"schedule must be 'sequential' or 'mix', got {schedule!r}")
        self.stages = stages or [{"objectives": ["random"], "steps": total_steps // 2},
                                 {"objectives": ["next_all", "next"], "steps": total_steps - total_steps // 2}]
        for st in self.stages:
            bad = [o for o in st["objectives"] if o not in OBJECTIVES]
            if bad:
                raise ValueError(f"unknown objectives {bad} in stages; choose from {OBJECTIVES}")
        self.weights = {k: float(v) for k, v in (weights or {o: 1.0 for o in OBJECTIVES}).items()}
        self.model = TokenUnifyModel(TokenUnifyConfig(preset=preset, crop=tuple(crop), token=tuple(token),
                                                      mask_ratio=mask_ratio, random_fill=random_fill,
                                                      next_fill=next_fill, masked_only=masked_only,
                                                      model_overrides=dict(model_overrides or {})))
        self._rng = random.Random(seed)

    def objectives_at(self, step: int) -> tuple[str, ...]:
        """Objectives of the batch at global step ``step`` (the schedule, driven by the real step)."""
        if self.hparams.schedule == "sequential":
            edge = 0
            for st in self.stages:
                edge += int(st["steps"])
                if step < edge:
                    return tuple(st["objectives"])
            return tuple(self.stages[-1]["objectives"])
        if self.hparams.mix_mode == "sum":
            return tuple(o for o, w in self.weights.items() if w > 0)
        names = [o for o, w in self.weights.items() if w > 0]
        return (self._rng.choices(names, weights=[self.weights[o] for o in names])[0],)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        objectives = self.objectives_at(self.global_step)
        out = self.model(batch["raw"], objectives)
        if self.hparams.schedule == "mix" and self.hparams.mix_mode == "sum":
            loss = sum(self.weights[o] * v for o, v in out.losses.items())
        else:
            loss = out.loss
        for name, value in out.losses.items():
            self.log(f"train/loss_{name}", value, prog_bar=True)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        g = torch.Generator().manual_seed(1000 + batch_idx)  # same corruptions every validation
        out = self.model(batch["raw"], OBJECTIVES, generator=g)
        for name, value in out.losses.items():
            self.log(f"val/loss_{name}", value)
        self.log("val/loss", out.loss, prog_bar=True)

    def configure_optimizers(self):
        opt = _adamw(self.model, self.hparams.lr, self.hparams.weight_decay)
        return {"optimizer": opt, "lr_scheduler": _cosine(opt, self.hparams.total_steps, self.hparams.warmup_steps)}


class AffinitySegLit(LightningModule):
    """Fine-tuning SegMamba (3 output channels) on nearest-neighbour affinities of border-widened labels.

    ``pretrained``: a TokenUnify pretraining checkpoint (.ckpt/.pt/.safetensors); matching weights are
    loaded with a printed report, and a checkpoint with zero matching keys is an error."""

    task = "affinity"

    def __init__(self, preset: str = "tiny", crop: tuple[int, int, int] = (16, 80, 80), pretrained: str | None = None,
                 offsets: list[list[int]] | None = None, loss: str = "wmse", lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 0, total_steps: int = 1000,
                 model_overrides: dict[str, Any] | None = None, task: str = "affinity"):
        super().__init__()
        self.save_hyperparameters()
        self.offsets = [list(o) for o in (offsets or [[-1, 0, 0], [0, -1, 0], [0, 0, -1]])]
        if loss not in ("wmse", "bce"):
            raise ValueError(f"loss must be 'wmse' or 'bce', got {loss!r}")
        self.net = SegMamba(segmamba_config(preset, out_chans=len(self.offsets), **dict(model_overrides or {})))
        self.load_report: dict[str, list[str]] | None = None
        if pretrained:
            state, _ = load_checkpoint_state(pretrained)
            self.load_report = load_matching_weights(self.net, state, source=str(pretrained))

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        widened = torch.from_numpy(widen_border(labels.cpu().numpy())).to(labels.device)
        return seg_to_affinity(widened, self.offsets)  # (B, C, Z, Y, X)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        target = self.targets(batch["labels"]).to(batch["raw"].dtype)
        logits = self.net(batch["raw"])
        if self.hparams.loss == "wmse":
            loss = weighted_mse(torch.sigmoid(logits), target)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt = _adamw(self.net, self.hparams.lr, self.hparams.weight_decay)
        return {"optimizer": opt, "lr_scheduler": _cosine(opt, self.hparams.total_steps, self.hparams.warmup_steps)}
