"""Training of the EAGLE drafter (:mod:`ar_gen.eagle`) against a frozen target GPT.

``EagleDrafterModule`` is the LightningModule of ``configs/drafter_eagle_shapes.yaml`` (``vtw fit``);
:func:`train_eagle` is the same step in a plain loop (used by the demo stage, no Trainer needed).
Batches are the token-shard items ``{"tokens": (B, N) long, "label": (B,) long, ...}``.

The target is loaded from ``target_ckpt`` (``ar_gen.gpt.load_gpt``), frozen, kept in eval mode and
**not** registered as a sub-module, so the drafter checkpoint holds only the drafter's own weights
(fc + one layer); the shared embedding and head are read from the target at load time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from ar_gen.eagle import EagleDrafter, eagle_config


def target_states(target: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced target pass: tokens (B, N), labels (B,) -> hidden (B, N, C), logits (B, N, V) at
    positions 0..N-1 (position 0 = the class token)."""
    with torch.no_grad():
        out = target(tokens[:, :-1], labels, return_hidden=True)
    return out.hidden, out.logits


def drop_labels(target: nn.Module, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace labels by the null class with the target's label-dropout rate (the CFG uncond stream)."""
    c = target.config
    if c.class_dropout_prob <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < c.class_dropout_prob
    return torch.where(drop, torch.full_like(labels, c.num_classes), labels)


def eagle_step(drafter: EagleDrafter, target: nn.Module, batch: dict[str, Any],
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    tokens = batch["tokens"].long()
    if tokens.dim() != 2:
        raise ValueError(f"EAGLE drafter training expects tokens (B, N), got {tuple(tokens.shape)}")
    labels = drop_labels(target, batch["label"].long(), generator if drafter.training else None)
    hidden, logits = target_states(target, tokens, labels)
    return drafter.loss(target, tokens, hidden, logits)


def _lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class EagleDrafterModule(LightningModule):
    """Thin LightningModule: frozen target + trainable EAGLE drafter, logs ``train|val/loss``."""

    def __init__(self, target_ckpt: str, hidden_noise: float = 0.2, ce_weight: float = 0.1, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, max_steps: int = 2000,
                 betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__()
        from ar_gen.gpt import load_gpt

        target, _ = load_gpt(target_ckpt)
        target.requires_grad_(False)
        self._target = [target.eval()]  # a list keeps it out of state_dict / parameters()
        config = eagle_config(target.config, hidden_noise=hidden_noise, ce_weight=ce_weight)
        self.drafter = EagleDrafter(config)
        from dataclasses import asdict

        self.save_hyperparameters()
        self.hparams["eagle_config"] = asdict(config)

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def on_fit_start(self) -> None:
        self._target[0] = self.target.to(self.device).eval()

    def on_validation_start(self) -> None:
        self._target[0] = self.target.to(self.device).eval()

    def _common_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        out = eagle_step(self.drafter, self.target, batch)
        bs = batch["tokens"].shape[0]
        for key, value in out.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("loss", "top1_agree"), batch_size=bs)
        return out["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._common_step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.drafter.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.drafter.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(hp.warmup_steps, hp.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_eagle(target: nn.Module, batches: Iterable[dict[str, Any]], steps: int, lr: float = 1e-3,
                warmup_steps: int = 30, seed: int = 0, time_budget_s: float | None = None,
                progress: bool = True, autocast_dtype: torch.dtype | None = None,
                **config_overrides: Any) -> tuple[EagleDrafter, list[dict[str, float]]]:
    """Plain training loop (demo): returns the drafter (eval mode, fp32 weights) and a short log.

    ``batches`` is cycled; stops after ``steps`` or ``time_budget_s`` seconds, whichever first. With a time
    budget the learning-rate schedule follows whichever of steps and elapsed time is further along, so a
    budget-limited run still ends at the low learning rate. ``autocast_dtype`` (e.g. ``torch.bfloat16`` on
    CPUs with bf16 matrix units) runs the target and drafter forwards under autocast.
    """
    import itertools
    import time

    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    target.eval().requires_grad_(False)
    drafter = EagleDrafter(eagle_config(target.config, **config_overrides)).train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = _lr_lambda(warmup_steps, steps)
    device_type = next(drafter.parameters()).device.type
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="EAGLE drafter", disable=not progress)
    done = 0
    for step, batch in enumerate(itertools.cycle(batches)):
        if step >= steps or (time_budget_s is not None and time.perf_counter() - start > time_budget_s):
            break
        elapsed = time.perf_counter() - start
        at = step if time_budget_s is None or step < warmup_steps else max(
            step, warmup_steps + int(elapsed / time_budget_s * (steps - warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = lr * schedule(at)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = eagle_step(drafter, target, batch, gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 0.5)  # LANTERN: gradient clip 0.5
        opt.step()
        if step % 20 == 0:
            log.append({"step": step, **{k: float(v.detach()) for k, v in out.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}", agree=f"{float(out['top1_agree']):.2f}")
        done = step + 1
    bar.close()
    if done and (not log or log[-1]["step"] != done - 1):
        log.append({"step": done - 1, **{k: float(v.detach()) for k, v in out.items()}})
    return drafter.eval(), log


def token_batches(shards_dir: str | os.PathLike, batch_size: int = 64, max_batches: int = 100,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_batches`` training batches ``{"tokens", "label"}`` from ``vtw tokenize`` shards."""
    from tokenizers_img.shards import TokenShardDataModule

    data = TokenShardDataModule(str(shards_dir), batch_size=batch_size)
    data.setup("fit")
    out = []
    for batch in data.train_dataloader():
        out.append({"tokens": batch["tokens"].long(), "label": batch["label"].long()})
        if len(out) >= max_batches:
            break
    if not out:
        raise ValueError(f"no training batches in token shards {shards_dir}")
    return out
