"""FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv:2403.06764).

After LM layer K (default 2) runs, vision tokens are ranked by the head-averaged attention they
receive from the last prompt token, and only the top ``keep`` stay for the remaining layers (their
RoPE positions unchanged, as in FastV). Same runner and interface as MustDrop
(:mod:`compression.llava_runner`), so the two are compared at the same vision-token budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from compression.llava_runner import VISION, DropPlan


@dataclass
class FastVConfig:
    layer: int = 2  # K
    keep: int = 16  # vision tokens kept after layer K


def fastv_keep(probs: Tensor, kind: Tensor, valid: Tensor, keep: int) -> Tensor:
    """probs: (B, H, L, L); the last position is the last prompt token (left padding). keep (B, L)."""
    score = probs[:, :, -1].float().mean(1)  # (B, L) attention from the last token
    cols = (kind == VISION) & valid
    score = score.masked_fill(~cols, -1.0)
    ranks = score.argsort(1, descending=True).argsort(1)
    return valid & (~cols | (ranks < keep))


def make_plan(cfg: FastVConfig) -> DropPlan:
    return DropPlan(drop_layers=(cfg.layer,), rule=lambda li, probs, ctx: fastv_keep(probs, ctx["kind"], ctx["valid"], cfg.keep))


def budget_matched_keep(mean_tokens: float, full_tokens: float, num_layers: int, layer: int = 2) -> int:
    """FastV ``keep`` giving the same layer-averaged vision-token count as another method."""
    k = (mean_tokens * num_layers - layer * full_tokens) / (num_layers - layer)
    return max(1, int(round(k)))

