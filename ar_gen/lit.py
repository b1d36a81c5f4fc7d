"""LightningModule for the image GPT: next-token training on token shards (class labels or captions).

A thin wrapper around :class:`ar_gen.gpt.GPT` (LlamaGen recipe, fact sheet 1(a)): AdamW (betas 0.9/0.95)
with weight decay only on >= 2-D parameters (matrices and embedding tables; never norms), linear
warm-up then cosine decay to ``min_lr_ratio * lr`` over ``trainer.max_steps``, gradient clipping through
``trainer.gradient_clip_val``, optional EMA of the weights (``ema_decay``; saved as ``ema_model.*`` and
preferred by :func:`ar_gen.gpt.load_gpt`), bf16 through ``trainer.precision``. ``compile=True`` runs the
training loss through ``torch.compile`` (Inductor; on 2 CPU cores the demo GPT trains 1.5x faster per step
after ~25 s of compiling, ``benchmarks/bench_gpt_compile.py``); validation stays eager, and if
compiling fails (no C++ compiler, no Triton) training warns once and continues eagerly.
``optimizer="muon"`` trains the blocks' weight matrices with Muon (:class:`vision.optim.MuonAdamW`,
Moonlight's AdamW-matched update scale, ``muon_lr_scale`` times ``lr``) and keeps AdamW for embeddings,
the output head and norms (:func:`optimizer_groups`); one optimizer, so the schedule and clipping are shared.

Batches are dicts from ``tokenizers_img.shards.TokenShardDataModule``: ``tokens`` (B, N) or
(B, N, token_each) long, ``label`` (B,) long, ``caption`` list[str]. A caption-conditioned model
(``model_type: t2i``) encodes captions on the fly with a frozen open_clip text tower
(:class:`ar_gen.caption.CaptionEncoder`, ``text_tower`` / ``text_tower_weights``).

Logged: ``train/loss``, ``train/lr``, ``val/loss``, ``val/acc`` (top-1 next-token accuracy).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch

from ar_gen.gpt import GPT, GPTConfig, gpt_config
from vision.optim import MuonAdamW


class GPTModule(pl.LightningModule):
    """Train a GPT preset (``preset`` + ``overrides``, or a full ``gpt_config`` dict from a checkpoint)."""

    def __init__(
        self,
        preset: str = "GPT-tiny",
        vocab_size: int = 512,
        block_size: int = 64,
        num_classes: int = 30,
        token_each: int = 1,
        model_type: str = "c2i",
        overrides: dict[str, Any] | None = None,
        gpt_config: dict[str, Any] | None = None,
        text_tower: str | None = None,
        text_tower_weights: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        ema_decay: float | None = None,
        optimizer: str = "adamw",
        muon_lr_scale: float = 1.0,
        time_budget_s: float | None = None,
        tokenizer_dir: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.caption_encoder = None
        if gpt_config is not None:
            cfg = GPTConfig(**gpt_config)
        else:
            extra: dict[str, Any] = dict(overrides or {})
            if model_type == "t2i":
                if not text_tower:
                    raise ValueError("model_type 't2i' needs text_tower (e.g. 'clip-tiny-32' or 'open_clip:ViT-B-32')")
                enc = self._build_caption_encoder()
                extra.setdefault("caption_dim", enc.width)
                extra.setdefault("cls_token_num", enc.context_length)
            cfg = _make_config(preset, vocab_size=vocab_size, block_size=block_size, num_classes=num_classes,
                               token_each=token_each, model_type=model_type, **extra)
        if cfg.model_type == "t2i" and self.caption_encoder is None:
            self._build_caption_encoder()
        self.hparams["gpt_config"] = asdict(cfg)  # the checkpoint is self-describing (load_gpt reads it)
        self.model = GPT(cfg)
        self.ema_model: GPT | None = None
        self._compiled_loss = None  # torch.compile(self.model.training_loss), built on the first training step
        self._compile_failed = False
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)

    def _build_caption_encoder(self):
        from ar_gen.caption import CaptionEncoder

        if not self.hparams.text_tower:
            raise ValueError("a t2i GPT checkpoint needs text_tower in its hyper-parameters")
        enc = CaptionEncoder.from_name(self.hparams.text_tower, self.hparams.text_tower_weights)
        object.__setattr__(self, "caption_encoder", enc)  # not a submodule: frozen, not in the checkpoint
        return enc

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def compiled(self) -> bool:
        """True once training steps run through ``torch.compile`` (False when off or fallen back to eager)."""
        return self._compiled_loss is not None and not self._compile_failed

    # ------------------------------------------------------------------ steps
    def condition(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.config.model_type == "c2i":
            if "label" not in batch:
                raise KeyError("batch has no 'label' (class-conditional GPT)")
            return batch["label"].long()
        if "caption" not in batch:
            raise KeyError("batch has no 'caption' (caption-conditioned GPT)")
        enc = self.caption_encoder
        enc.to(self.device)
        return enc(batch["caption"])  # (B, L, W)

    def _training_loss(self, tokens: torch.Tensor, cond: torch.Tensor, stage: str):
        """``model.training_loss``, compiled for training steps when ``compile`` is on (eager fallback)."""
        if stage != "train" or not self.hparams.compile or self._compile_failed:
            return self.model.training_loss(tokens, cond)
        if self._compiled_loss is None:
            compiled = torch.compile(self.model.training_loss)
            try:
                out = compiled(tokens, cond)
            except Exception as err:  # compiler toolchain missing or unsupported here: train eagerly
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"GPTModule(compile=True): torch.compile failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); training eagerly instead")
                self._compile_failed = True
                return self.model.training_loss(tokens, cond)
            self._compiled_loss = compiled
            return out
        return self._compiled_loss(tokens, cond)

    def _common_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        tokens = batch["tokens"].long()
        c = self.config
        want = (c.block_size,) if c.token_each == 1 else (c.block_size, c.token_each)
        if tuple(tokens.shape[1:]) != want:
            raise ValueError(f"batch tokens {tuple(tokens.shape)} do not fit the GPT (expects (B, {want})): "
                             "check block_size / token_each against the tokenizer of the shards")
        out = self._training_loss(tokens, self.condition(batch), stage)
        self.log(f"{stage}/loss", out.loss, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train",
                 batch_size=tokens.shape[0], sync_dist=stage != "train")
        if stage != "train":
            acc = (out.logits.argmax(-1) == tokens).float().mean()
            self.log(f"{stage}/acc", acc, on_epoch=True, batch_size=tokens.shape[0], sync_dist=True)
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._common_step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "test")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_model is None:
            return
        d = self.hparams.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1.0 - d)  # e = d*e + (1-d)*p

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        groups = optimizer_groups(self.model, hp.weight_decay, hp.optimizer == "muon", hp.lr * hp.muon_lr_scale)
        if hp.optimizer == "muon":
            bf16 = self._trainer is not None and "bf16" in str(self.trainer.precision)
            opt: torch.optim.Optimizer = MuonAdamW(groups, lr=hp.lr, betas=tuple(hp.betas),
                                                   ns_dtype=torch.bfloat16 if bf16 else torch.float32)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        total = int(total) if total and math.isfinite(total) else 0
        budget = hp.time_budget_s
        self._t0: float | None = None

        def factor(step: int) -> float:
            if budget and total > hp.warmup_steps and step >= hp.warmup_steps:
                now = time.monotonic()
                if self._t0 is None:
                    self._t0 = now
                frac_time = (now - self._t0) / budget  # progress after warm-up by wall-clock
                frac_step = (step - hp.warmup_steps) / (total - hp.warmup_steps)
                step = hp.warmup_steps + int(max(frac_time, frac_step) * (total - hp.warmup_steps))
            return lr_factor(step, hp.warmup_steps, total, hp.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def optimizer_groups(model: GPT, weight_decay: float, muon: bool = False,
                     muon_lr: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups: weight decay on >= 2-D tensors only; with ``muon`` the blocks' 2-D weights
    (``layers.i.attention.wqkv`` split into q/k/v, ``wo``, ``feed_forward.w1|w2|w3``) form Muon groups at
    ``muon_lr`` and the embeddings, output heads and norms stay with AdamW (Muon's recipe)."""
    hidden, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if muon and name.startswith("layers.") and p.dim() == 2:
            hidden.append((name, p))
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = []
    if hidden:
        fused = [p for n, p in hidden if n.endswith("attention.wqkv.weight")]
        plain = [p for n, p in hidden if not n.endswith("attention.wqkv.weight")]
        n_kv = model.config.n_kv_head or model.config.n_head
        if n_kv != model.config.n_head and fused:  # GQA: q and k/v blocks differ in size; keep wqkv whole
            plain, fused = plain + fused, []
        for params, split in ((fused, 3), (plain, 1)):
            if params:
                groups.append({"params": params, "muon": True, "split": split, "weight_decay": weight_decay,
                               **({} if muon_lr is None else {"lr": muon_lr})})
    groups.append({"params": decay, "weight_decay": weight_decay})
    groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` (0: constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _make_config(preset: str, **kw: Any) -> GPTConfig:
    return gpt_config(preset, **kw)
