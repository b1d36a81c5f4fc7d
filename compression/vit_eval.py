"""Evaluate token merging on a ViT classifier: accuracy, agreement with the unmerged model, measured
and analytic FLOPs, tokens per block and images/s; ratio sweeps and the accuracy-vs-FLOPs plot.
Shared by ``vtw compress vit`` and ``benchmarks/bench_tome_pitome.py``."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compression import pitome, tome
from compression.flops import count_flops, timm_vit_flops
from compression.patching import merge_state, remove_patch


@dataclass
class Arm:
    method: str  # none | tome | pitome
    ratio: float | None = None  # pitome kept ratio per layer
    r: int | None = None  # tome tokens per layer
    prop_attn: bool = True
    mode: str = "deit"
    margin: float | None = None
    r_schedule: tuple[int, ...] | None = None  # tome: tokens removed at each layer (overrides r)
    label: str | None = None  # name of a scheduled arm, e.g. "tome @ pitome rho=0.9"

    @property
    def name(self) -> str:
        if self.method == "tome" and self.r_schedule is not None:
            return (self.label or "tome r=" + "/".join(map(str, self.r_schedule))) + ("" if self.prop_attn else " noprop")
        if self.method == "tome":
            return f"tome r={self.r}" + ("" if self.prop_attn else " noprop")
        if self.method == "pitome":
            return f"pitome {self.mode} rho={self.ratio}" + ("" if self.prop_attn else " noprop")
        return "none"

    def apply(self, net: nn.Module) -> None:
        remove_patch(net)
        if self.method == "tome":
            r = list(self.r_schedule) if self.r_schedule is not None else int(self.r)
            tome.patch(net, r=r, prop_attn=self.prop_attn)
        elif self.method == "pitome":
            pitome.patch(net, ratio=float(self.ratio), margin=self.margin, prop_attn=self.prop_attn, mode=self.mode)
        elif self.method != "none":
            raise ValueError(f"unknown method {self.method!r}; choose none, tome or pitome")


def removed_per_layer(row: dict[str, Any]) -> tuple[int, ...]:
    """Tokens a merged arm removed at each block, from a row of :func:`evaluate_arm` (tokens entering each
    block and the final count): the schedule that makes ToMe merge exactly as many tokens as that arm."""
    tokens = [int(t) for t in row["tokens"].split(",")] + [int(row["tokens_final"])]
    return tuple(a - b for a, b in zip(tokens, tokens[1:]))


def load_eval_images(image_size: int, num_samples: int, seed: int = 0, max_count: int = 1,
                     split: str = "test") -> tuple[Tensor, Tensor]:
    from datasets.shapes import ShapesDataset

    ds = ShapesDataset(split, num_samples=num_samples, image_size=image_size, seed=seed, max_count=max_count)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.inference_mode()
def predict(net: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([net(images[i:i + batch_size]).argmax(-1).cpu() for i in range(0, len(images), batch_size)])


@torch.inference_mode()
def images_per_second(net: nn.Module, images: Tensor, batch_size: int, repeats: int = 10, warmup: int = 2) -> float:
    batch = images[:batch_size]
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    for _ in range(warmup):
        net(batch)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        net(batch)
        sync()
        times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def evaluate_arm(net: nn.Module, arm: Arm, images: Tensor, labels: Tensor, reference: Tensor | None = None,
                 batch_size: int = 256, time_batch: int = 64, repeats: int = 10) -> dict[str, Any]:
    """One row: accuracy, agreement, FLOPs (measured, analytic), tokens per block, images/s."""
    arm.apply(net)
    try:
        flops, _ = count_flops(net, images[:1])
        state = merge_state(net)
        tokens_in = state.tokens if state else None
        tokens_out = state.tokens_out if state else None
        analytic = timm_vit_flops(net, tokens_in, tokens_out) if hasattr(net, "blocks") else None
        preds = predict(net, images, batch_size)
        ips = images_per_second(net, images, time_batch, repeats=repeats) if repeats > 0 else float("nan")
    finally:
        remove_patch(net)
    row = {
        "arm": arm.name, "method": arm.method, "ratio": arm.ratio, "r": arm.r,
        "acc": float((preds == labels.cpu()).float().mean()) * 100,
        "agree": float((preds == reference).float().mean()) * 100 if reference is not None else 100.0,
        "gflops": flops / 1e9, "gflops_analytic": analytic / 1e9 if analytic else None,
        "tokens_final": tokens_out[-1] if tokens_out else None,
        "tokens": ",".join(map(str, tokens_in)) if tokens_in else "",
        "img_per_s": ips,
    }
    return row


def add_relative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in rows if r["method"] == "none")
    for row in rows:
        row["flops_cut_%"] = 100 * (1 - row["gflops"] / base["gflops"])
        row["acc_drop"] = base["acc"] - row["acc"]
        row["speedup"] = row["img_per_s"] / base["img_per_s"] if base["img_per_s"] else None
    return rows


def interp_acc(rows: list[dict[str, Any]], method: str, gflops: float) -> float | None:
    """Accuracy of ``method`` linearly interpolated at ``gflops`` (None outside its measured range)."""
    pts = sorted((r["gflops"], r["acc"]) for r in rows if r["method"] == method)
    for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
        if f0 <= gflops <= f1:
            return a0 if f1 == f0 else a0 + (a1 - a0) * (gflops - f0) / (f1 - f0)
    return None


def plot_acc_vs_flops(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["arm"].split(" r=")[0].split(" rho=")[0] + (" noprop" if "noprop" in r["arm"] else "")
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["gflops"])
        ax.plot([r["gflops"] * 1e3 for r in rs], [r["acc"] for r in rs], "o-" if len(rs) > 1 else "k*",
                label=key, markersize=8 if len(rs) == 1 else 4)
    ax.set_xlabel("MFLOPs / image (FlopCounterMode, math SDPA)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
