"""A LLaVA prefill / decode runner with token-dropping hooks, over the weights of a Hugging Face
``LlavaForConditionalGeneration`` (CLIP vision tower + projector + Llama LM; transformers 5.x layout).

Why a runner instead of HF ``forward``: HF LLaVA insists that the number of image placeholder
tokens equals the number of image features, the LM layers cannot shrink the sequence between
layers, and the cache cannot be pruned per layer. The runner reuses every HF sub-module (norms,
projections, MLPs, rotary embedding, projector) and re-implements only the sequence bookkeeping:

- vision: embeddings -> pre-LN -> the first ``L + vision_feature_layer + 1`` layers (LLaVA takes
  ``hidden_states[-2]``); an optional ``stage1`` hook may merge tokens after layer 0, after which the
  remaining layers run with a key-padding mask (per-sample token counts, no batch minimum);
  "default" strategy drops CLS; projector.
- language model, batched with **left padding**: per row [prefix | kept vision | text]; position
  ids count the row's real tokens; an additive mask (causal + key padding; pad queries see
  themselves so no row is all -inf). After a layer listed in ``plan.drop_layers`` runs, its
  attention probabilities (explicit softmax at that layer only; SDPA elsewhere) go to
  ``plan.rule`` which returns a keep mask; the sequence is gathered (left padding again). Kept
  tokens keep their original RoPE positions unless ``plan.compact_positions``.
- cache: per layer (K, V, key-valid, token id); ``plan.prune_kv`` rebuilds the caches of layers
  >= the first drop layer to the final survivors (MustDrop stage 3). Decoding uses one position
  per row for all layers (the released MustDrop code gives layers different positions).

Shapes: B batch, L sequence, C width, H heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD, PREFIX, VISION, TEXT = 0, 1, 2, 3


@dataclass
class VisionOut:
    feats: Tensor  # (B, V, C_text) projected features (padded)
    valid: Tensor  # (B, V) bool
    key: Tensor  # (B, V) bool: tokens that later stages never drop (MustDrop key set)
    tokens_per_layer: list[float] = field(default_factory=list)  # mean tokens entering each vision layer


@dataclass
class DropPlan:
    """How to drop tokens. ``stage1``: callable(h (B, 1+N, C), grid) -> (h, valid, size) applied after
    vision layer 0; ``key_ratio``: fraction of patches kept as the key set (top CLS attention at the
    layer after the feature layer); ``rule``: callable(layer, probs, ctx) -> keep (B, L) bool."""

    stage1: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]] | None = None
    key_ratio: float = 0.0
    drop_layers: tuple[int, ...] = ()
    rule: Callable[[int, Tensor, dict[str, Tensor]], Tensor] | None = None
    prune_kv: bool = False
    compact_positions: bool = False


@dataclass
class LayerCache:
    k: Tensor  # (B, Hkv, L_l, D) rotated keys
    v: Tensor  # (B, Hkv, L_l, D)
    valid: Tensor  # (B, L_l) bool
    tid: Tensor  # (B, L_l) long: index of the token in the assembled prefill sequence (-1 pad)


@dataclass
class PrefillOut:
    logits: Tensor  # (B, vocab) at the last position
    cache: list[LayerCache]
    next_pos: Tensor  # (B,) RoPE position of the next token
    vision_tokens: list[float]  # mean kept vision tokens entering each LM layer
    vision_in: Tensor  # (B,) vision tokens fed to LM layer 0
    vision_out: Tensor  # (B,) vision tokens after the last drop
    vision: VisionOut | None = None


# ----------------------------------------------------------------------------------------------
# module access (transformers 4.x / 5.x)


def parts(model: nn.Module) -> dict[str, Any]:
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
    vt = inner.vision_tower
    vis = vt.vision_model if hasattr(vt, "vision_model") else vt
    lm = inner.language_model
    lm = lm.model if hasattr(lm, "model") and hasattr(lm.model, "layers") else lm
    cfg = model.config
    return {"vision": vis, "projector": inner.multi_modal_projector, "lm": lm, "lm_head": model.lm_head,
            "feature_layer": cfg.vision_feature_layer, "strategy": cfg.vision_feature_select_strategy,
            "image_token_id": cfg.image_token_index if hasattr(cfg, "image_token_index") else cfg.image_token_id}


def _layer_out(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------
# vision


def clip_layer_masked(layer: nn.Module, h: Tensor, bias: Tensor) -> Tensor:
    """HF CLIPEncoderLayer with an additive key bias (B, 1, 1, N) (0 keep, -inf pad)."""
    at = layer.self_attn
    x = layer.layer_norm1(h)
    B, N, C = x.shape
    shape = (B, N, -1, at.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (at.q_proj, at.k_proj, at.v_proj))  # (B, H, N, D)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=at.scale)
    h = h + at.out_proj(o.transpose(1, 2).reshape(B, N, C))
    return h + layer.mlp(layer.layer_norm2(h))


def cls_attention(layer: nn.Module, h: Tensor, bias: Tensor | None) -> Tensor:
    """Head-averaged attention of CLS (query 0) over all tokens at ``layer``: (B, N)."""
    at = layer.self_attn
    x = layer.layer_norm1(h)
    B, N, _ = x.shape
    q = at.q_proj(x[:, :1]).view(B, 1, -1, at.head_dim).transpose(1, 2)  # (B, H, 1, D)
    k = at.k_proj(x).view(B, N, -1, at.head_dim).transpose(1, 2)  # (B, H, N, D)
    scores = (q @ k.transpose(-1, -2)).float() * at.scale  # (B, H, 1, N)
    if bias is not None:
        scores = scores + bias.float()
    return scores.softmax(-1).mean(1)[:, 0]


def compact(valid: Tensor, *tensors: Tensor, left: bool = False) -> tuple[Tensor, ...]:
    """Gather the valid entries of each row to the front (or the back with ``left``), keeping their
    order; trims to the longest row. Returns (valid', *tensors')."""
    key = (valid if left else ~valid).to(torch.int8)
    order = torch.sort(key, dim=1, stable=True).indices  # (B, L)
    n = int(valid.sum(1).max())
    order = order[:, -n:] if left else order[:, :n]
    out = [valid.gather(1, order)]
    for t in tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        out.append(t.gather(1, idx))
    return tuple(out)


def encode_images(model: nn.Module, pixel_values: Tensor, plan: DropPlan | None = None) -> VisionOut:
    p = parts(model)
    vis = p["vision"]
    layers = list(vis.encoder.layers)
    L = len(layers)
    fl = p["feature_layer"]
    if not isinstance(fl, int):
        raise ValueError("only a single vision_feature_layer is supported")
    n_run = L + fl + 1 if fl < 0 else fl  # hidden_states[i] is the output of layer i-1
    h = vis.embeddings(pixel_values.to(vis.embeddings.patch_embedding.weight.dtype))
    h = vis.pre_layrnorm(h)
    B, N, _ = h.shape
    grid = int(math.isqrt(N - 1))
    valid = torch.ones(B, N, dtype=torch.bool, device=h.device)
    bias = None
    counts = []
    for i in range(n_run):
        counts.append(float(valid.sum(1).float().mean()) if bias is not None else float(h.shape[1]))
        h = _layer_out(layers[i](h, None)) if bias is None else clip_layer_masked(layers[i], h, bias)
        if i == 0 and plan is not None and plan.stage1 is not None:
            h, valid, _ = plan.stage1(h, grid)
            valid, h = compact(valid, h)
            bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, -math.inf)[:, None, None]
        elif valid.shape[1] != h.shape[1]:  # a merging patch (ToMe / PiToMe) shortened all rows equally
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    key = torch.zeros_like(valid)
    if plan is not None and plan.key_ratio > 0:
        attn = cls_attention(layers[min(n_run, L - 1)], h, bias)  # (B, N')
        attn = attn.masked_fill(~valid, -1.0)
        attn[:, 0] = -1.0  # CLS is not a patch
        n_patch = valid[:, 1:].sum(1)
        n_key = torch.ceil(plan.key_ratio * n_patch.float()).long()  # per row
        ranks = attn.argsort(1, descending=True).argsort(1)
        key = (ranks < n_key[:, None]) & valid
    if p["strategy"] == "default":
        h, valid, key = h[:, 1:], valid[:, 1:], key[:, 1:]
    return VisionOut(feats=p["projector"](h), valid=valid, key=key, tokens_per_layer=counts)


# ----------------------------------------------------------------------------------------------
# language model


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


# Up to this many keys the attention runs on CPU as two matmuls + softmax: on 2 CPU cores at batch 50, 4 heads of
# 24 dims, 17 keys take 0.24 ms that way vs 0.67 ms in SDPA's kernel; at 30 keys they are even (1.0 / 0.9 ms).
SMALL_ATTENTION_KEYS = 24


# Rows of a batch keep different numbers of vision tokens, so the padded (B, L) layout after a drop can be
# mostly padding (MustDrop on the shapes-VQA LLaVA at batch 50: 59 of 90 slots valid in the first layers,
# 14 of 19 later). Below this valid share the position-wise parts of a layer (norms, projections, MLP)
# run on the packed valid tokens only; attention stays in the padded layout.
PACK_BELOW = 0.9


def llama_layer(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, want_probs: bool,
                past: LayerCache | None = None, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One Llama decoder layer. h: (B, Lq, C); bias: (B, 1, Lq, Lk) additive; ``past`` keys are
    prepended; ``valid`` (B, Lq) bool (optional, prefill): padded slots, whose outputs nobody reads,
    are skipped by the position-wise parts when they are many (``PACK_BELOW``; K/V and h of padded
    slots are then 0 / unchanged). Returns (h, probs (B, H, Lq, Lk) or None, k_new, v_new) with k/v
    (B, Hkv, Lq, D)."""
    if valid is not None and past is None and valid.numel() and float(valid.float().mean()) < PACK_BELOW:
        return _llama_layer_packed(layer, h, cos, sin, bias, want_probs, valid)
    at = layer.self_attn
    x = _rms_norm(layer.input_layernorm, h)
    B, Lq, _ = x.shape
    shape = (B, Lq, -1, at.head_dim)
    q = at.q_proj(x).view(shape).transpose(1, 2)  # (B, H, Lq, D)
    k = at.k_proj(x).view(shape).transpose(1, 2)  # (B, Hkv, Lq, D)
    v = at.v_proj(x).view(shape).transpose(1, 2)
    q, k = _rotate(q, k, cos, sin)
    h, probs = _attend_and_mlp(layer, h, q, k, v, bias, want_probs, past)
    return h, probs, k, v


def _attend_and_mlp(layer: nn.Module, h: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, want_probs: bool,
                    past: LayerCache | None) -> tuple[Tensor, Tensor | None]:
    at = layer.self_attn
    B, Lq, _ = h.shape
    kk, vv = (k, v) if past is None else (torch.cat([past.k, k], 2), torch.cat([past.v, v], 2))
    o, probs = _attention(at, q, kk, vv, bias, want_probs)
    h = h + at.o_proj(o.transpose(1, 2).reshape(B, Lq, -1))
    h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
    return h, probs


def _attention(at: nn.Module, q: Tensor, kk: Tensor, vv: Tensor, bias: Tensor, want_probs: bool) -> tuple[Tensor, Tensor | None]:
    """(o (B, H, Lq, D), probs or None) for q (B, H, Lq, D), keys/values (B, Hkv, Lk, D)."""
    groups = q.shape[1] // kk.shape[1]
    if groups > 1:
        kk, vv = kk.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1)
    probs = None
    if want_probs:  # explicit softmax (fp32) only where a rule needs the map
        scores = (q @ kk.transpose(-1, -2)).float() * at.scaling + bias.float()
        probs = scores.softmax(-1)
        o = probs.to(vv.dtype) @ vv
    elif kk.shape[2] <= SMALL_ATTENTION_KEYS and q.device.type == "cpu":  # few keys: two matmuls beat SDPA's CPU kernel
        o = ((q @ kk.transpose(-1, -2)) * at.scaling + bias.to(q.dtype)).softmax(-1) @ vv
    else:
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias.to(q.dtype), scale=at.scaling)
    return o, probs


def _llama_layer_packed(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, want_probs: bool,
                        valid: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """:func:`llama_layer` computing norms, projections and the MLP on the valid tokens only (packed
    (N, C)); attention runs in the padded layout, where padded keys are masked by ``bias``."""
    from transformers.models.llama.modeling_llama import rotate_half

    at = layer.self_attn
    B, L, C = h.shape
    D = at.head_dim
    idx = valid.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the valid slots
    hv = h.reshape(B * L, C)[idx]  # (N, C)
    x = _rms_norm(layer.input_layernorm, hv)
    q, k, v = (proj(x).view(len(idx), -1, D) for proj in (at.q_proj, at.k_proj, at.v_proj))  # (N, heads, D)
    c, s_ = cos.reshape(B * L, D)[idx][:, None], sin.reshape(B * L, D)[idx][:, None]  # (N, 1, D)
    q, k = q * c + rotate_half(q) * s_, k * c + rotate_half(k) * s_

    def padded(t: Tensor) -> Tensor:  # (N, heads, D) -> (B, heads, L, D), zeros in padded slots
        out = t.new_zeros(B * L, t.shape[1], D).index_copy_(0, idx, t)
        return out.view(B, L, t.shape[1], D).transpose(1, 2)

    qp, kp, vp = padded(q), padded(k), padded(v)
    o, probs = _attention(at, qp, kp, vp, bias, want_probs)  # (B, H, L, D)
    o = o.transpose(1, 2).reshape(B * L, -1)[idx]  # (N, H * D)
    hv = hv + at.o_proj(o)
    hv = hv + layer.mlp(_rms_norm(layer.post_attention_layernorm, hv))
    h = h.reshape(B * L, C).index_copy(0, idx, hv).view(B, L, C)
    return h, probs, kp, vp


def _rms_norm(norm: nn.Module, h: Tensor) -> Tensor:
    """HF's LlamaRMSNorm; in fp32 as one fused ``F.rms_norm`` call (the same math; HF's version is seven
    elementwise ops, a tenth of a prefill's time once most vision tokens are dropped). Other dtypes keep
    HF's order of casts."""
    eps = getattr(norm, "variance_epsilon", None)
    if h.dtype != torch.float32 or eps is None or norm.weight.dtype != torch.float32:
        return norm(h)
    return F.rms_norm(h, (h.shape[-1],), norm.weight, eps)


def _prefill_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, L, L): causal over the (order-preserving) sequence, padded keys masked, diagonal open."""
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=valid.device)[None]
    return torch.zeros(B, 1, L, L, dtype=dtype, device=valid.device).masked_fill(~allowed[:, None], -math.inf)


def assemble(model: nn.Module, prompts: list[Tensor], vision: VisionOut) -> dict[str, Tensor]:
    """Left-padded (B, L) sequence: per row prefix ids, valid vision features, text ids. Each prompt
    holds one run of image placeholder ids (any length; the kept features replace the run)."""
    p = parts(model)
    embed = p["lm"].embed_tokens
    rows = []
    for i, ids in enumerate(prompts):
        where = (ids == p["image_token_id"]).nonzero().flatten()
        if len(where) == 0:
            raise ValueError(f"prompt {i} has no image placeholder token (id {p['image_token_id']})")
        start, end = int(where[0]), int(where[-1]) + 1
        feats = vision.feats[i][vision.valid[i]]
        e = torch.cat([embed(ids[:start]), feats.to(embed.weight.dtype), embed(ids[end:])])
        kind = torch.cat([torch.full((start,), PREFIX), torch.full((len(feats),), VISION),
                          torch.full((len(ids) - end,), TEXT)]).to(ids.device)
        key = torch.cat([torch.zeros(start, dtype=torch.bool, device=ids.device), vision.key[i][vision.valid[i]],
                         torch.zeros(len(ids) - end, dtype=torch.bool, device=ids.device)])
        rows.append((e, kind, key))
    Lmax = max(len(r[1]) for r in rows)
    B, C = len(rows), rows[0][0].shape[-1]
    h = torch.zeros(B, Lmax, C, dtype=rows[0][0].dtype, device=rows[0][0].device)
    kind = torch.zeros(B, Lmax, dtype=torch.long, device=h.device)
    key = torch.zeros(B, Lmax, dtype=torch.bool, device=h.device)
    for i, (e, k, ks) in enumerate(rows):  # left padding
        n = len(k)
        h[i, Lmax - n:], kind[i, Lmax - n:], key[i, Lmax - n:] = e, k, ks
    valid = kind != PAD
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    tid = torch.arange(Lmax, device=h.device).expand(B, -1).masked_fill(~valid, -1)
    return {"h": h, "kind": kind, "key": key, "valid": valid, "pos": pos, "tid": tid}


@torch.no_grad()
def prefill(model: nn.Module, pixel_values: Tensor | None, prompts: list[Tensor], plan: DropPlan | None = None,
            vision: VisionOut | None = None) -> PrefillOut:
    """Vision tower + projector + LM prefill with the drops of ``plan`` (None: no dropping).
    ``vision`` replaces the tower's output (e.g. an empty one for a text-only FLOP baseline)."""
    p = parts(model)
    lm = p["lm"]
    if vision is None:
        vision = encode_images(model, pixel_values, plan)
    s = assemble(model, prompts, vision)
    h, kind, key, valid, pos, tid = s["h"], s["kind"], s["key"], s["valid"], s["pos"], s["tid"]
    vision_in = ((kind == VISION) & valid).sum(1)
    drop_layers = set(plan.drop_layers) if plan is not None and plan.rule is not None else set()
    cache: list[LayerCache] = []
    counts: list[float] = []
    cos, sin = lm.rotary_emb(h, pos)  # the positions and the mask change only at a drop: computed once per span
    bias = _prefill_bias(valid, h.dtype)
    for li, layer in enumerate(lm.layers):
        counts.append(float(((kind == VISION) & valid).sum(1).float().mean()))
        h, probs, k, v = llama_layer(layer, h, cos, sin, bias, want_probs=li in drop_layers, valid=valid)
        cache.append(LayerCache(k, v, valid, tid))
        if li in drop_layers:
            ctx = {"kind": kind, "valid": valid, "key": key, "pos": pos}
            keep = plan.rule(li, probs, ctx) & valid
            keep |= valid & (kind != VISION)  # rules only ever drop vision tokens
            valid, h, kind, key, pos, tid = _repad(keep, h, kind, key, pos, tid)
            if plan.compact_positions:
                pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            cos, sin = lm.rotary_emb(h, pos)
            bias = _prefill_bias(valid, h.dtype)
    h = lm.norm(h)
    logits = p["lm_head"](h[:, -1])
    if plan is not None and plan.prune_kv and drop_layers:
        prune_caches(cache, min(drop_layers), tid, valid)
    next_pos = pos.masked_fill(~valid, -1).max(1).values + 1
    return PrefillOut(logits=logits, cache=cache, next_pos=next_pos, vision_tokens=counts, vision_in=vision_in,
                      vision_out=((kind == VISION) & valid).sum(1), vision=vision)


def empty_vision(model: nn.Module, batch: int) -> VisionOut:
    """A VisionOut with no valid token (text-only prefill through the same code)."""
    C = parts(model)["lm"].embed_tokens.weight.shape[1]
    dev = parts(model)["lm"].embed_tokens.weight.device
    none = torch.zeros(batch, 1, dtype=torch.bool, device=dev)
    return VisionOut(feats=torch.zeros(batch, 1, C, device=dev), valid=none, key=none)


def _repad(keep: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Like ``compact(keep, ..., left=True)`` but returns the gathered keep mask as ``valid`` and
    marks padded slots (kind PAD, tid -1)."""
    valid, *out = compact(keep, *tensors, left=True)
    h, kind, key, pos, tid = out
    kind = kind.masked_fill(~valid, PAD)
    tid = tid.masked_fill(~valid, -1)
    key = key & valid
    return valid, h, kind, key, pos, tid


def _prune_cache(c: LayerCache, final_tid: Tensor, final_valid: Tensor) -> LayerCache:
    """Keep only the cache entries whose token survives to the end of prefill (MustDrop stage 3)."""
    survive = (c.tid[:, :, None] == final_tid.masked_fill(~final_valid, -2)[:, None, :]).any(-1) & c.valid
    valid, k, v, tid = compact(survive, c.k.transpose(1, 2), c.v.transpose(1, 2), c.tid, left=True)
    return LayerCache(k.transpose(1, 2), v.transpose(1, 2), valid, tid.masked_fill(~valid, -1))


def prune_caches(cache: list[LayerCache], first: int, final_tid: Tensor, final_valid: Tensor) -> None:
    """MustDrop stage 3 in place: the caches of layers ``first, ...`` keep only the final survivors.
    Same result as :func:`_prune_cache` layer by layer (the reference, tested), but the survivor
    order is computed once per token layout: the layers between two drops share one ``tid`` tensor,
    and the layers after the last drop already hold exactly the survivors (left as they are)."""
    orders: dict[int, tuple[Tensor, Tensor, Tensor] | None] = {}
    for li in range(first, len(cache)):
        c = cache[li]
        if id(c.tid) not in orders:
            if c.tid is final_tid or (c.tid.shape == final_tid.shape and torch.equal(c.valid, final_valid)
                                      and torch.equal(c.tid, final_tid)):
                orders[id(c.tid)] = None  # nothing to prune
            else:
                survive = (c.tid[:, :, None] == final_tid.masked_fill(~final_valid, -2)[:, None, :]).any(-1) & c.valid
                key = survive.to(torch.int8)
                n = int(survive.sum(1).max())
                order = torch.sort(key, dim=1, stable=True).indices[:, -n:]  # (B, n): survivors last, in order
                valid = survive.gather(1, order)
                orders[id(c.tid)] = (order, valid, c.tid.gather(1, order).masked_fill(~valid, -1))
        entry = orders[id(c.tid)]
        if entry is None:
            continue
        order, valid, tid = entry
        idx = order[:, None, :, None].expand(-1, c.k.shape[1], -1, c.k.shape[-1])  # (B, Hkv, n, D)
        cache[li] = LayerCache(c.k.gather(2, idx), c.v.gather(2, idx), valid, tid)


@torch.no_grad()
def decode_step(model: nn.Module, cache: list[LayerCache], token: Tensor, pos: Tensor) -> Tensor:
    """One greedy-decoding step for tokens (B,) at positions (B,); appends to ``cache``; returns logits (B, vocab)."""
    p = parts(model)
    lm = p["lm"]
    h = lm.embed_tokens(token)[:, None]  # (B, 1, C)
    cos, sin = lm.rotary_emb(h, pos[:, None])
    for li, layer in enumerate(lm.layers):
        c = cache[li]
        keys_valid = torch.cat([c.valid, torch.ones_like(c.valid[:, :1])], 1)  # (B, L_l + 1)
        bias = torch.zeros(keys_valid.shape, dtype=h.dtype, device=h.device).masked_fill(~keys_valid, -math.inf)
        h, _, k, v = llama_layer(layer, h, cos, sin, bias[:, None, None], want_probs=False, past=c)
        cache[li] = LayerCache(torch.cat([c.k, k], 2), torch.cat([c.v, v], 2), keys_valid,
                               torch.cat([c.tid, torch.full_like(c.tid[:, :1], -3)], 1))
    return p["lm_head"](lm.norm(h[:, -1]))


@torch.no_grad()
def generate(model: nn.Module, pixel_values: Tensor, prompts: list[Tensor], plan: DropPlan | None = None,
             max_new_tokens: int = 2) -> tuple[Tensor, PrefillOut]:
    """Greedy decoding: (B, max_new_tokens) token ids and the prefill record."""
    out = prefill(model, pixel_values, prompts, plan)
    tokens = [out.logits.argmax(-1)]
    pos = out.next_pos
    for _ in range(max_new_tokens - 1):
        logits = decode_step(model, out.cache, tokens[-1], pos)
        tokens.append(logits.argmax(-1))
        pos = pos + 1
    return torch.stack(tokens, 1), out


def kv_bytes(cache: list[LayerCache]) -> int:
    """Bytes of the valid cache entries (K and V of every layer)."""
    total = 0
    for c in cache:
        per_token = c.k.shape[1] * c.k.shape[3] * c.k.element_size() * 2
        total += int(c.valid.sum()) * per_token
    return total
