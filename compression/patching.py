"""In-place, undoable token-merging patches for three ViT implementations.

Supported towers (the block forward is replaced per instance; ``unpatch`` restores it):

- timm ``VisionTransformer`` (``model.blocks`` of ``timm.models.vision_transformer.Block``); keeps
  timm's ``fused_attn`` flag, ``q_norm/k_norm``, LayerScale ``ls1/ls2`` and a gated/normed attention;
  ``global_pool="avg"`` becomes a size-weighted average (ToMe's convention).
- open_clip ``VisionTransformer`` (``model.visual`` of a CLIP, or the tower itself): the
  ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (batch-first) is re-expressed with
  ``in_proj_weight`` so that the keys are available.
- Hugging Face ``CLIPVisionModel`` / ``CLIPVisionTransformer`` / ``CLIPEncoder`` and a
  ``LlavaForConditionalGeneration`` (its vision tower), transformers 5.x layout.

Placement (one spec for all backbones, the timm/DeiT row of the PiToMe code and ToMe): merging
happens between the attention and the MLP of a block, with the head-averaged keys of that block's
attention as the metric. Token sizes are carried across blocks in a per-model :class:`MergeState`
(reset when block 0 runs). Proportional attention adds ``log(size)`` to the attention logits.

A block that merges nothing while all sizes are still 1 runs its original forward, so ``ratio=1``
(or ``r=0``) is exactly the original model; :func:`block_forward` is the re-implementation used
otherwise (tested against the original forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from compression.merge import Merge, attention, merge_wavg

_ATTR = "_vtw_merge"


class MergeSpec(Protocol):
    prop_attn: bool

    def num_removed(self, layer: int, num_tokens: int, class_token: bool) -> int: ...

    def match(self, layer: int, metric: Tensor, class_token: bool) -> Merge | None: ...


@dataclass
class MergeState:
    spec: Any
    num_layers: int
    class_token: bool = True
    size: Tensor | None = None  # (B, N, 1) token sizes, None while all are 1
    tokens: list[int] = field(default_factory=list)  # tokens entering each block in the last forward
    tokens_out: list[int] = field(default_factory=list)  # tokens leaving each block (after its merge)

    def reset(self) -> None:
        self.size = None
        self.tokens = []
        self.tokens_out = []


@dataclass
class _Patch:
    family: str
    state: MergeState
    blocks: list[nn.Module]
    restore: list[tuple[Any, str, Any]]  # (object, attribute, previous instance value or _MISSING)


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# finding the blocks


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module], nn.Module, bool]:
    """(family, blocks, tower, has_class_token) for a supported model; ValueError otherwise."""
    name = type(model).__name__
    lineage = {cls.__name__ for cls in type(model).__mro__}  # subclasses (e.g. conv_clip's tower) count
    if "LlavaForConditionalGeneration" in lineage:
        return find_blocks(model.model.vision_tower)
    if lineage & {"CLIPVisionModel", "CLIPVisionTransformer"}:
        if hasattr(model, "vision_model"):  # transformers 4.x nesting
            return find_blocks(model.vision_model)
        return "hf_clip", list(model.encoder.layers), model, True
    if name == "CLIPEncoder":
        return "hf_clip", list(model.layers), model, True
    if hasattr(model, "visual") and hasattr(model.visual, "transformer"):  # open_clip CLIP
        return find_blocks(model.visual)
    if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):  # open_clip tower
        if getattr(model, "attn_pool", None) is not None or getattr(model, "pool_type", "tok") != "tok":
            raise ValueError("open_clip tower: only pool_type='tok' without attn_pool can be merged")
        return "open_clip", list(model.transformer.resblocks), model, model.class_embedding is not None
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # timm VisionTransformer
        blocks = list(model.blocks)
        if not all(type(b).__name__ == "Block" and hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
            raise ValueError("timm model: only plain timm vision_transformer.Block blocks can be merged")
        prefix = getattr(model, "num_prefix_tokens", 1)
        has_cls = getattr(model, "cls_token", None) is not None
        if prefix != int(has_cls):
            raise ValueError(f"timm model with {prefix} prefix tokens (register/dist tokens) is not supported")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("timm model with an attention-pool head is not supported")
        return "timm", blocks, model, has_cls
    raise ValueError(f"cannot find transformer blocks to merge in {name}; supported: timm VisionTransformer, "
                     "open_clip CLIP/VisionTransformer, HF CLIPVisionModel/LlavaForConditionalGeneration")


# ----------------------------------------------------------------------------------------------
# block re-implementations: (block, x, size) -> (x after attention residual, keys (B, H, N, D))


def _timm_attn(block: nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    a = block.attn
    h = block.norm1(x)
    B, N, _ = h.shape
    gate = a.gate(h).sigmoid() if getattr(a, "gate", None) is not None else None
    qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    o = attention(q, k, v, size, scale=None if a.fused_attn else a.scale, fused=a.fused_attn)
    o = a.norm(o.transpose(1, 2).reshape(B, N, a.attn_dim))  # (B, N, H*D)
    if gate is not None:
        o = o * gate
    o = a.proj_drop(a.proj(o))
    return x + block.drop_path1(block.ls1(o)), k


def _timm_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _open_clip_attn(block: nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    mha = block.attn
    h = block.ln_1(x)
    B, N, C = h.shape
    H = mha.num_heads
    qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, D)
    o = attention(q, k, v, size)
    o = mha.out_proj(o.transpose(1, 2).reshape(B, N, C))
    return x + block.ls_1(o), k


def _open_clip_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _hf_clip_attn(block: nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    at = block.self_attn
    h = block.layer_norm1(x)
    B, N, C = h.shape
    shape = (B, N, -1, at.head_dim)
    q = at.q_proj(h).view(shape).transpose(1, 2)  # (B, H, N, D)
    k = at.k_proj(h).view(shape).transpose(1, 2)
    v = at.v_proj(h).view(shape).transpose(1, 2)
    o = attention(q, k, v, size, scale=at.scale)
    o = at.out_proj(o.transpose(1, 2).reshape(B, N, C))
    return x + o, k


def _hf_clip_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.mlp(block.layer_norm2(x))


_FAMILIES = {
    "timm": (_timm_attn, _timm_mlp),
    "open_clip": (_open_clip_attn, _open_clip_mlp),
    "hf_clip": (_hf_clip_attn, _hf_clip_mlp),
}


def block_forward(family: str, block: nn.Module, x: Tensor, state: MergeState, layer: int) -> Tensor:
    """Re-implemented block with merging between attention and MLP. x: (B, N, C) -> (B, N - r, C)."""
    attn_fn, mlp_fn = _FAMILIES[family]
    size = state.size if state.spec.prop_attn else None
    x, k = attn_fn(block, x, size)
    m = state.spec.match(layer, k.mean(dim=1), state.class_token)  # metric: keys averaged over heads
    if m is not None:
        x, state.size = merge_wavg(m, x, state.size)
    return mlp_fn(block, x)


def _make_forward(family: str, block: nn.Module, state: MergeState, layer: int, original):
    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if layer == 0:
            state.reset()
        if family == "hf_clip":
            mask = args[0] if args else kwargs.get("attention_mask")
            bad = mask is not None
        else:
            bad = any(a is not None for a in args) or any(v is not None and v is not False for v in kwargs.values())
        if bad:
            raise ValueError("token merging does not support attention masks / cross-attention inputs")
        state.tokens.append(x.shape[1])
        if state.size is None and state.spec.num_removed(layer, x.shape[1], state.class_token) == 0:
            out = original(x, *args, **kwargs)  # nothing merged yet and nothing to merge here: exact original
        else:
            out = block_forward(family, block, x, state, layer)
        state.tokens_out.append((out[0] if isinstance(out, tuple) else out).shape[1])
        return out

    return forward


# ----------------------------------------------------------------------------------------------
# patch / unpatch


def apply_patch(model: nn.Module, spec: Any) -> nn.Module:
    """Patch ``model`` in place with the merging rule ``spec``; a second call replaces the first."""
    if getattr(model, _ATTR, None) is not None:
        remove_patch(model)
    family, blocks, tower, has_cls = find_blocks(model)
    state = MergeState(spec=spec, num_layers=len(blocks), class_token=has_cls)
    restore: list[tuple[Any, str, Any]] = []

    def set_attr(obj: Any, attr: str, value: Any) -> None:
        restore.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, value)

    for i, blk in enumerate(blocks):
        set_attr(blk, "forward", _make_forward(family, blk, state, i, blk.forward))
    if family == "timm" and getattr(tower, "global_pool", "token") == "avg":
        original_pool = tower.pool

        def pool(x: Tensor, pool_type: str | None = None) -> Tensor:
            if (pool_type or tower.global_pool) == "avg" and state.size is not None:
                n = tower.num_prefix_tokens
                s = state.size[:, n:]  # (B, T, 1)
                return (x[:, n:] * s).sum(1) / s.sum(1)  # size-weighted mean (ToMe)
            return original_pool(x, pool_type)

        set_attr(tower, "pool", pool)
    model.__dict__[_ATTR] = _Patch(family=family, state=state, blocks=blocks, restore=restore)
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch` (no-op on an unpatched model)."""
    p = model.__dict__.pop(_ATTR, None)
    if p is None:
        return model
    for obj, attr, previous in reversed(p.restore):
        if previous is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, previous)
    return model


def merge_state(model: nn.Module) -> MergeState | None:
    """The patch state (``.tokens``: tokens entering each block in the last forward), or None."""
    p = getattr(model, _ATTR, None)
    return None if p is None else p.state


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def run_unmerged_reference(family: str, block: nn.Module, x: Tensor, size: Tensor | None = None) -> Tensor:
    """Re-implemented block without merging (for tests against the original forward)."""
    attn_fn, mlp_fn = _FAMILIES[family]
    y, _ = attn_fn(block, x, size)
    return mlp_fn(block, y)

