"""PiToMe: Tran, Nguyen, Nguyen, et al., "Accelerating Transformers with Spectrum-Preserving Token
Merging", NeurIPS 2024 (arXiv:2405.16148).

Per layer l (of L), with T non-CLS tokens entering the merge and kept ratio rho_l:

- r_l = floor(T - T * rho_l) tokens are removed (rho >= 0.5, so 2r <= T); token count decays
  geometrically, T_{l+1} = T_l - r_l;
- energy E_i = mean_j ELU(cos(k_i, k_j) - m_l) on head-averaged keys k (paper Eq. 4 as coded);
- margin schedule m_l = m_0 (1 - l / L), m_0 = 0.75 (timm/DeiT spec of the released code);
- mode "deit" (default, released timm/DeiT spec): energy-ordered bipartite soft matching in the
  first ceil(L/2) layers, strict PiToMe (top-2r energy tokens split alternately, all A merge) after;
  "strict" or "bsm" use one rule in every layer;
- size-weighted averaging with sizes carried through the layers; proportional attention
  (log-size bias) ON by default and switchable (the released timm patch drops it:
  ``prop_attn=False`` reproduces that);
- the CLS token is never merged.

Usage::

    from compression import pitome
    pitome.patch(vit, ratio=0.9)          # or ratio=[1.0, 0.9, ...], margin=0.75 or a list
    logits = vit(images)
    pitome.unpatch(vit)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from compression.merge import Merge, pitome_match
from compression.patching import apply_patch, find_blocks, remove_patch

DEFAULT_MARGIN = 0.75  # m_0 of the timm/DeiT patch in the released code
MODES = ("deit", "strict", "bsm")


@dataclass
class PiToMeSpec:
    ratio: list[float]  # kept fraction of non-CLS tokens at each layer
    margin: list[float]
    bsm: list[bool]
    prop_attn: bool = True
    alpha: float = 1.0

    def num_removed(self, layer: int, num_tokens: int, class_token: bool) -> int:
        T = num_tokens - int(class_token)
        r = math.floor(T - T * self.ratio[layer])
        return max(0, min(r, T // 2))

    def match(self, layer: int, metric: Tensor, class_token: bool) -> Merge | None:
        r = self.num_removed(layer, metric.shape[1], class_token)
        if r == 0:
            return None
        return pitome_match(metric, r, self.margin[layer], class_token=class_token,
                            bsm=self.bsm[layer], alpha=self.alpha)


def make_spec(num_layers: int, ratio: float | list[float] = 0.9, margin: float | list[float] | None = None,
              prop_attn: bool = True, mode: str = "deit", alpha: float = 1.0) -> PiToMeSpec:
    L = num_layers
    ratios = list(ratio) if isinstance(ratio, list | tuple) else [float(ratio)] * L
    if len(ratios) != L:
        raise ValueError(f"ratio list has {len(ratios)} entries for {L} layers")
    if any(not 0.5 <= p <= 1.0 for p in ratios):
        raise ValueError(f"PiToMe ratios must lie in [0.5, 1] (2r <= T), got {ratios}")
    if isinstance(margin, list | tuple):
        margins = [float(m) for m in margin]
        if len(margins) != L:
            raise ValueError(f"margin list has {len(margins)} entries for {L} layers")
    else:
        m0 = DEFAULT_MARGIN if margin is None else float(margin)
        margins = [m0 - m0 * layer / L for layer in range(L)]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bsm = [mode == "bsm" or (mode == "deit" and layer < math.ceil(L / 2)) for layer in range(L)]
    return PiToMeSpec(ratio=ratios, margin=margins, bsm=bsm, prop_attn=prop_attn, alpha=alpha)


def patch(model: nn.Module, ratio: float | list[float] = 0.9, margin: float | list[float] | None = None,
          prop_attn: bool = True, mode: str = "deit", alpha: float = 1.0) -> nn.Module:
    """Patch ``model`` in place with PiToMe keeping ``ratio`` of the tokens per layer; returns it."""
    _, blocks, _, _ = find_blocks(model)
    return apply_patch(model, make_spec(len(blocks), ratio, margin, prop_attn, mode, alpha))


def unpatch(model: nn.Module) -> nn.Module:
    return remove_patch(model)
