"""MustDrop: Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model", arXiv:2411.10803, on HF ``LlavaForConditionalGeneration`` through
:mod:`compression.llava_runner`.

- **Stage 1 (vision encoding)**, after vision layer 0: the patch grid is cut into non-overlapping
  w x w windows (w = 3); window score = mean pairwise cosine similarity of its w^2 tokens, self
  excluded, sum_{i != j} cos(x_i, x_j) / (w^2 (w^2 - 1)); every window with score >= tau (0.8)
  is merged into its bottom-right token by averaging (sizes are not used later, as released).
  Per image, no batch minimum. Kept tokens stay in raster order (the released code puts merged
  tokens first). **Key set**: the top ceil(0.08 (N - 1)) patches by head-averaged CLS attention
  at the vision layer after the feature layer (LLaVA-1.5: the last CLIP layer); never dropped.
- **Stage 2 (prefill)**, after each LM layer in ``prune_layers`` (default 2, 6, 10, 14, clipped to
  the model depth): with A the head-averaged attention of text rows (question + template) to vision
  columns, a vision token j is dropped iff sum_t A_tj < gamma * sum_k sum_t A_tk AND max_t A_tj < alpha
  (dual-attention filter), unless it is in the key set.
- **Stage 3 (decoding)**: the KV caches of layers >= the first pruning layer keep only the tokens
  that survive the last pruning stage (earlier layers keep their full caches).

Each stage is switchable; batches of any size work (left padding, per-row masks); kept tokens keep
their RoPE positions (``compact_positions=True`` renumbers them as the released code does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from compression.llava_runner import TEXT, VISION, DropPlan


@dataclass
class MustDropConfig:
    stage1: bool = True
    stage2: bool = True
    stage3: bool = True
    window: int = 3
    merge_threshold: float = 0.8  # tau
    key_ratio: float = 0.08
    prune_layers: tuple[int, ...] = (2, 6, 10, 14)
    global_thr: float = 0.001  # gamma (released TextVQA-192 setting; calibrate per model)
    individual_thr: float = 0.001  # alpha
    compact_positions: bool = False


def window_merge(h: Tensor, grid: int, window: int = 3, threshold: float = 0.8) -> tuple[Tensor, Tensor, Tensor]:
    """Stage-1 merge. h: (B, 1 + grid^2, C) with CLS first. Returns (h', valid (B, N) bool, size
    (B, N, 1)): merged windows hold their mean at the bottom-right token, the other members invalid."""
    if grid % window:
        raise ValueError(f"patch grid {grid}x{grid} is not tiled by {window}x{window} windows")
    B, N, C = h.shape
    g = grid // window
    idx = torch.arange(grid * grid, device=h.device).view(g, window, g, window).permute(0, 2, 1, 3)
    idx = idx.reshape(g * g, window * window) + 1  # (nW, w^2) raster indices (CLS offset), row-major in window
    win = h[:, idx]  # (B, nW, w^2, C)
    v = F.normalize(win.float(), dim=-1)
    sim = v @ v.transpose(-1, -2)  # (B, nW, w^2, w^2)
    n = window * window
    score = (sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    merged = score >= threshold  # (B, nW)
    mean = win.mean(2)  # (B, nW, C)
    out = h.clone()
    br = idx[:, -1]  # bottom-right token of each window
    out[:, br] = torch.where(merged[..., None], mean, h[:, br])
    valid = torch.ones(B, N, dtype=torch.bool, device=h.device)
    members = idx[:, :-1]  # (nW, w^2 - 1)
    valid[:, members.reshape(-1)] = ~merged.repeat_interleave(n - 1, dim=1)
    size = torch.ones(B, N, 1, dtype=h.dtype, device=h.device)
    size[:, br, 0] = torch.where(merged, float(n), 1.0).to(h.dtype)
    return out, valid, size


def window_merge_ref(h: Tensor, grid: int, window: int = 3, threshold: float = 0.8) -> tuple[Tensor, Tensor]:
    """Loop reference for :func:`window_merge` (returns h', valid)."""
    out = h.clone()
    B, N, _ = h.shape
    valid = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        for wy in range(grid // window):
            for wx in range(grid // window):
                members = [1 + (wy * window + dy) * grid + wx * window + dx for dy in range(window) for dx in range(window)]
                tot, cnt = 0.0, 0
                for i in members:
                    for j in members:
                        if i != j:
                            tot += float(F.cosine_similarity(h[b, i].double(), h[b, j].double(), dim=0))
                            cnt += 1
                if tot / cnt >= threshold:
                    out[b, members[-1]] = h[b, members].mean(0)
                    for i in members[:-1]:
                        valid[b, i] = False
    return out, valid


def dual_attention_keep(probs: Tensor, kind: Tensor, valid: Tensor, key: Tensor, global_thr: float,
                        individual_thr: float) -> Tensor:
    """Stage-2 rule. probs: (B, H, L, L) post-softmax; kind/valid/key: (B, L). Returns keep (B, L)."""
    A = probs.float().mean(1)  # (B, L, L) rows = queries
    rows = (kind == TEXT) & valid
    cols = (kind == VISION) & valid
    A = A * rows[:, :, None] * cols[:, None, :]
    g = A.sum(1)  # (B, L) summed attention each column receives from text
    m = A.max(1).values  # (B, L) strongest single text attention
    total = g.sum(-1, keepdim=True)
    drop = (g < global_thr * total) & (m < individual_thr) & cols & ~key
    return valid & ~drop


def make_plan(cfg: MustDropConfig, num_layers: int) -> DropPlan:
    layers = tuple(li for li in cfg.prune_layers if li < num_layers - 1)  # dropping after the last layer is moot
    plan = DropPlan(compact_positions=cfg.compact_positions)
    if cfg.stage1:
        plan.stage1 = lambda h, grid: window_merge(h, grid, cfg.window, cfg.merge_threshold)
        plan.key_ratio = cfg.key_ratio
    if cfg.stage2:
        plan.drop_layers = layers
        plan.rule = lambda li, probs, ctx: dual_attention_keep(probs, ctx["kind"], ctx["valid"], ctx["key"],
                                                               cfg.global_thr, cfg.individual_thr)
        plan.prune_kv = cfg.stage3
    return plan
