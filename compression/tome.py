"""ToMe: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT but Faster",
ICLR 2023 (arXiv:2210.09461), as the original defines it (not the ratio-based variant shipped in
the PiToMe repository):

- bipartite soft matching on head-averaged keys, A = even positions, B = odd positions
  (:func:`compression.merge.tome_match`); the CLS token is never merged;
- a constant number ``r`` of tokens removed per layer (or an explicit per-layer list), clamped to
  half of the mergeable tokens;
- size-weighted merging and proportional attention softmax(q k^T / sqrt(d) + log s)
  (``prop_attn=True`` by default, as in ToMe's off-the-shelf evaluation).

Usage::

    from compression import tome
    tome.patch(vit, r=8)        # timm / open_clip / HF CLIP tower, in place
    logits = vit(images)
    tome.unpatch(vit)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from compression.merge import Merge, tome_match
from compression.patching import apply_patch, find_blocks, remove_patch


@dataclass
class ToMeSpec:
    r: list[int]  # tokens removed at each layer
    prop_attn: bool = True

    def num_removed(self, layer: int, num_tokens: int, class_token: bool) -> int:
        return max(0, min(self.r[layer], (num_tokens - int(class_token)) // 2))

    def match(self, layer: int, metric: Tensor, class_token: bool) -> Merge | None:
        return tome_match(metric, self.r[layer], class_token=class_token)


def parse_r(r: int | list[int] | tuple[int, float], num_layers: int) -> list[int]:
    """ToMe schedules: int (constant), (r, inflection) (linear schedule, ToMe ``parse_r``), or a list."""
    if isinstance(r, list):
        if len(r) != num_layers:
            raise ValueError(f"r list has {len(r)} entries for {num_layers} layers")
        return [int(v) for v in r]
    if isinstance(r, tuple):  # ToMe utils.parse_r: linear from r(1-inflect) to r(1+inflect)
        r0, inflect = r
        min_val = int(r0 * (1.0 - inflect))
        max_val = 2 * r0 - min_val
        step = (max_val - min_val) / max(num_layers - 1, 1)
        return [int(min_val + step * i) for i in range(num_layers)]
    if int(r) < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return [int(r)] * num_layers


def patch(model: nn.Module, r: int | list[int] | tuple[int, float] = 8, prop_attn: bool = True) -> nn.Module:
    """Patch ``model`` in place with ToMe removing ``r`` tokens per layer; returns it."""
    _, blocks, _, _ = find_blocks(model)
    return apply_patch(model, ToMeSpec(r=parse_r(r, len(blocks)), prop_attn=prop_attn))


def unpatch(model: nn.Module) -> nn.Module:
    return remove_patch(model)
