"""Llama-style transformer building blocks: RMSNorm, SwiGLU, rotary embeddings (1D/2D), attention, KV cache.

References
- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (arXiv 1910.07467):
  ``y = x / sqrt(mean(x^2) + eps) * g`` (computed in fp32, cast back, then scaled, as Llama/LlamaGen).
- SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer" (arXiv 2002.05202):
  ``FFN(x) = W2 (silu(W1 x) * W3 x)``; hidden size ``find_multiple(int(2 * 4d / 3), multiple_of)``.
- RoPE: Su et al. 2021, "RoFormer" (arXiv 2104.09864). Rotary pairs are *adjacent* elements
  ``(2j, 2j+1)`` (gpt-fast / LlamaGen layout, not ``rotate_half``); pair ``j`` rotates by
  ``pos * base^(-2j/D)``.
- 2D RoPE as in LlamaGen (Sun et al. 2024, arXiv 2406.06525, ``precompute_freqs_cis_2d``): for head
  dim ``D``, the first ``D/4`` pairs rotate by the row index and the last ``D/4`` pairs by the column
  index, each with frequencies ``base^(-2i/(D/2))``, ``i < D/4``; tokens in raster order. The
  ``cls_token_num`` condition-prefix rows are **all zeros** (cos = sin = 0), so q and k of prefix
  tokens are zero vectors (LlamaGen's quirk; keep it for checkpoint compatibility). ``prefix="identity"``
  gives the "fixed" variant (cos = 1, sin = 0) for new models.
- Static KV cache and full-length boolean masks: gpt-fast / LlamaGen ``KVCache``.

Parameter names follow LlamaGen's ``autoregressive/models/gpt.py`` (``wqkv``, ``wo``, ``w1``/``w3``/``w2``,
``attention_norm``, ``ffn_norm``, ``attention``, ``feed_forward``) so its checkpoints map one to one.

Shapes (B batch, T new tokens, S cache length, H heads, Hkv kv heads, D head dim, C model width)

| function / module               | input                                   | output            |
|---------------------------------|-----------------------------------------|-------------------|
| ``apply_rotary_emb(x, f)``      | x (B, T, H, D), f (T, D/2, 2) or (B, T, D/2, 2) | (B, T, H, D) |
| ``attention(q, k, v, mask)``    | q (B, H, T, D), k/v (B, Hkv, S, D), mask bool (.., T, S) True = attend | (B, H, T, D) |
| ``Attention(x, freqs, input_pos)``  | x (B, T, C), input_pos (T,) long    | (B, T, C)         |
| ``KVCache.update(pos, k, v)``   | pos (T,), k/v (B, Hkv, T, D)            | cache (B, Hkv, S, D) |

Packed weights for decoding: :func:`packed_linears` (a context manager) runs every fp32 ``nn.Linear``
under a module on weights pre-packed once whenever the flattened input has one of the given row counts:
the small-M matmuls of a KV-cached decode step. Two backends, the kernels TorchInductor uses for frozen
CPU linears: MKL's packed sgemm (``cblas_sgemm_pack`` through ``torch.ops.mkl``) and oneDNN's blocked
weights (``torch.ops.mkldnn._linear_pointwise``). ``VTW_PACKED_LINEAR=auto`` (the default) takes MKL on
Intel CPUs and oneDNN elsewhere: on an AMD EPYC (Zen 4) MKL's fp32 path is 2-3x slower than oneDNN's at
16 rows, slower even than ``F.linear`` (``benchmarks/bench_packed_linear.py``); ``mkl`` / ``onednn``
force one, ``0`` switches packing off. Any other input, and every module outside the ``with`` block,
goes through ``F.linear`` (the reference).

Fast path / reference: ``attention`` dispatches to ``F.scaled_dot_product_attention`` when
``fused=True`` (the default, switch globally with ``VTW_FUSED_ATTN=0`` or :func:`set_fused_attn`) and to
:func:`attention_ref` (explicit fp32 softmax) otherwise; tests flip the flag on the same module. One
exception on the fused side: bf16/fp16 training on CPU goes through :func:`attention_eager_lowp` (two
low-precision matmuls around an fp32 softmax) for up to ``EAGER_LOWP_MAX_KEYS`` keys, 2-5x faster
there than SDPA's flash kernel.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "DropPath",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "TransformerBlock",
    "apply_rotary_emb",
    "apply_rotary_emb_ref",
    "attention",
    "attention_ref",
    "find_multiple",
    "packed_linear_available",
    "packed_linear_backend",
    "packs_rows",
    "packed_linears",
    "precompute_freqs_cis",
    "precompute_freqs_cis_2d",
    "set_fused_attn",
    "use_fused_attn",
]

_PACKED_LINEAR = os.environ.get("VTW_PACKED_LINEAR", "auto").strip().lower()
_PACKED_BACKENDS = ("mkl", "onednn")
_USE_FUSED_ATTN = os.environ.get("VTW_FUSED_ATTN", "1") not in ("0", "false", "False")


def use_fused_attn() -> bool:
    """Global default for new :class:`Attention` modules (env ``VTW_FUSED_ATTN``, default on)."""
    return _USE_FUSED_ATTN


def set_fused_attn(enable: bool) -> None:
    """Set the global default for *new* modules; existing modules keep their ``fused_attn`` flag."""
    global _USE_FUSED_ATTN
    _USE_FUSED_ATTN = bool(enable)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


# --------------------------------------------------------------------------------------------------
# Norm and feed-forward
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2, -1) + eps)`` in fp32, cast back to ``x.dtype``, times a learned ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return self._norm(x.float()).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases, dropout on the output (LlamaGen ``ffn_dropout``)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if hidden_dim is None:
            hidden_dim = int(2 * (4 * dim) / 3)
            if ffn_dim_multiplier is not None:
                hidden_dim = int(ffn_dim_multiplier * hidden_dim)
            hidden_dim = find_multiple(hidden_dim, multiple_of)
        dd = {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(dim, hidden_dim, bias=False, **dd)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, **dd)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False, **dd)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016); identity at rate 0 or in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings (cache layout (positions, D/2, 2) = (cos, sin) per rotary pair)
# --------------------------------------------------------------------------------------------------
PrefixMode = Literal["zero", "identity"]


def _prefix_rows(cls_token_num: int, n_pairs: int, prefix: PrefixMode) -> torch.Tensor:
    rows = torch.zeros(cls_token_num, n_pairs, 2)
    if prefix == "identity":
        rows[..., 0] = 1.0
    elif prefix != "zero":
        raise ValueError(f"prefix must be 'zero' (LlamaGen) or 'identity', got {prefix!r}")
    return rows


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float = 10000.0, cls_token_num: int = 0,
                         prefix: PrefixMode = "zero") -> torch.Tensor:
    """1D RoPE table: ``(cls_token_num + seq_len, n_elem/2, 2)`` with ``[..., 0] = cos``, ``[..., 1] = sin``.

    Pair ``j`` of position ``t`` rotates by ``t * base^(-2j/n_elem)``. The ``cls_token_num`` prefix rows
    come first (zeros as in LlamaGen, or identity).
    """
    if n_elem % 2:
        raise ValueError(f"rotary dim must be even, got {n_elem}")
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))  # (D/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (T, D/2)
    cache = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (T, D/2, 2)
    return torch.cat([_prefix_rows(cls_token_num, n_elem // 2, prefix), cache], dim=0)


def precompute_freqs_cis_2d(grid_size: int | tuple[int, int], n_elem: int, base: float = 10000.0,
                            cls_token_num: int = 0, prefix: PrefixMode = "zero") -> torch.Tensor:
    """LlamaGen's 2D RoPE table: ``(cls_token_num + h*w, n_elem/2, 2)`` for a raster-order grid.

    Pairs ``0 .. D/4-1`` rotate by the row index, pairs ``D/4 .. D/2-1`` by the column index; both use
    ``freqs_i = base^(-2i/(D/2))``. ``grid_size`` may be an int (square) or ``(h, w)``.
    """
    if n_elem % 4:
        raise ValueError(f"2D RoPE needs head dim divisible by 4 (two axes x pairs), got {n_elem}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    half = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (D/4,)
    rows = torch.outer(torch.arange(h, dtype=torch.float32), freqs)  # (h, D/4)
    cols = torch.outer(torch.arange(w, dtype=torch.float32), freqs)  # (w, D/4)
    grid = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)  # (h, w, D/2)
    cache = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (h*w, D/2, 2)
    return torch.cat([_prefix_rows(cls_token_num, half, prefix), cache], dim=0)


def apply_rotary_emb_ref(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Readable reference: rotate adjacent pairs of ``x`` (B, T, H, D) by ``freqs_cis`` (T, D/2, 2) or
    (B, T, D/2, 2) holding (cos, sin); fp32 maths."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    f = freqs_cis.float()
    if f.dim() == 3:
        f = f.unsqueeze(0)  # (1, T, D/2, 2)
    f = f.unsqueeze(2)  # (B|1, T, 1, D/2, 2)
    cos, sin = f[..., 0], f[..., 1]
    x0, x1 = xs[..., 0], xs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(3).type_as(x)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Same result as :func:`apply_rotary_emb_ref` as one complex multiply, (x0 + i x1)(cos + i sin):
    3 kernels instead of ~10, which matters in per-token decoding where RoPE runs twice per layer.
    Under ``torch.compile`` the real-arithmetic reference is used instead: Inductor fuses it into one
    kernel, while complex tensors make it fall back to eager kernels."""
    if torch.compiler.is_compiling():
        return apply_rotary_emb_ref(x, freqs_cis)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    if xs.storage_offset() % 2 or any(st % 2 for st in xs.stride()[:-1]) or xs.stride(-1) != 1:
        xs = xs.contiguous()  # view_as_complex needs (re, im) pairs on even strides
    f = freqs_cis.float()
    if f.dim() == 3:
        f = f.unsqueeze(0)  # (1, T, D/2, 2)
    fc = torch.view_as_complex(f.contiguous()).unsqueeze(2)  # (B|1, T, 1, D/2) complex
    out = torch.view_as_real(torch.view_as_complex(xs) * fc)  # (B, T, H, D/2, 2)
    return out.flatten(3).type_as(x)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped KV heads (B, Hkv, S, D) -> (B, H, S, D): query head i uses kv head i // (H / Hkv)."""
    n_head, n_kv = q.shape[1], k.shape[1]
    if n_head == n_kv:
        return k, v
    return k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)


def _mask_scores(scores: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Apply SDPA's causal triangle (top-left aligned) and a bool (True = attend) or additive mask to fp32 scores."""
    if is_causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Readable reference: ``softmax(q k^T * scale + mask) v`` in fp32, grouped KV heads repeated.

    q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0; mask bool (True = attend) or additive float,
    broadcastable to (B, H, T, S). ``is_causal`` aligns the causal triangle at the top-left (like SDPA).
    """
    k, v = _repeat_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, T, S)
    probs = torch.softmax(_mask_scores(scores, mask, is_causal), dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, H, T, D)


def attention_eager_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Attention as two matmuls in the inputs' (bf16/fp16) dtype with an fp32 softmax (Hugging Face's "eager"
    recipe under autocast). Same semantics as :func:`attention_ref`.

    Used for CPU training in bf16/fp16: there SDPA's flash kernel is several times slower than these two
    matmuls (fwd+bwd of (64, 6, 65, 32) bf16: ~70 ms vs ~14 ms on 2 cores; ``benchmarks/bench_cpu_attention.py``).
    """
    k, v = _repeat_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale  # (B, H, T, S), fp32 for the softmax
    probs = torch.softmax(_mask_scores(scores, mask, is_causal), dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, T, D)


# Longest key sequence for which bf16/fp16 CPU training uses the eager path: at 65 tokens it is 2-5x faster
# than SDPA's flash kernel, at 257 tokens it was 0.5-1.4x in repeated runs (benchmarks/bench_cpu_attention.py).
EAGER_LOWP_MAX_KEYS = 128


def _cpu_lowp_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad) and k.shape[-2] <= EAGER_LOWP_MAX_KEYS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
              fused: bool = True) -> torch.Tensor:
    """Scaled dot-product attention; ``fused`` picks SDPA, else :func:`attention_ref` (same semantics).

    Fused path: SDPA, except for bf16/fp16 CPU training (autograd on) over at most ``EAGER_LOWP_MAX_KEYS``
    keys, where :func:`attention_eager_lowp` is faster.
    """
    if not fused:
        return attention_ref(q, k, v, mask, is_causal, dropout_p, scale)
    if _cpu_lowp_training(q, k, v):
        return attention_eager_lowp(q, k, v, mask, is_causal, dropout_p, scale)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)


@functools.lru_cache(maxsize=1)
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _backend_ops_present(backend: str) -> bool:
    try:
        if backend == "mkl":
            return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
                    and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def packed_linear_backend(choice: str | None = None) -> str | None:
    """The packing backend :func:`packed_linears` uses: ``"mkl"``, ``"onednn"`` or None (no packing).

    ``choice`` (default: ``$VTW_PACKED_LINEAR``, else ``"auto"``): ``auto`` = MKL on GenuineIntel CPUs,
    oneDNN on others (AMD: MKL's fp32 kernels there are slower than ``F.linear`` at decode row counts),
    falling back to whichever this torch build has; ``mkl`` / ``onednn`` = that one, None when the build
    lacks it; ``0`` / ``off`` / ``false`` = None."""
    choice = (_PACKED_LINEAR if choice is None else choice).strip().lower()
    if choice in ("0", "off", "false", "none"):
        return None
    if choice in _PACKED_BACKENDS:
        return choice if _backend_ops_present(choice) else None
    if choice not in ("auto", "1", "true"):
        raise ValueError(f"VTW_PACKED_LINEAR / backend must be auto, mkl, onednn or 0, got {choice!r}")
    order = ("mkl", "onednn") if _cpu_vendor() == "GenuineIntel" else ("onednn", "mkl")
    return next((b for b in order if _backend_ops_present(b)), None)


def packed_linear_available(backend: str | None = None) -> bool:
    """True when :func:`packed_linear_backend` finds a packing backend (x86 CPU wheels have both)."""
    return packed_linear_backend(backend) is not None


# Below this many rows the unpacked path (gemv-like) is as fast as the packed one or faster; from 4 rows on
# packing wins (``benchmarks/bench_packed_linear.py``: 192- to 2048-wide layers at 1-16 rows). oneDNN also
# wins below 4 rows on layers of at least ONEDNN_SMALL_ROWS_MIN_WEIGHTS weights (768x768 at 2 rows: 55 vs
# 131 us on an AMD EPYC), while on a 192x576 layer at 1 row its call overhead doubles the time (29 vs 16 us).
PACKED_MIN_ROWS = 4
ONEDNN_SMALL_ROWS_MIN_WEIGHTS = 1 << 19


def packs_rows(backend: str | None, num_weights: int, rows: int) -> bool:
    """Whether :func:`packed_linears` packs a layer of ``num_weights`` weights for ``rows`` rows."""
    if backend is None:
        return False
    return rows >= PACKED_MIN_ROWS or (backend == "onednn" and num_weights >= ONEDNN_SMALL_ROWS_MIN_WEIGHTS)


def _row_counts(rows: int | Iterable[int]) -> tuple[int, ...]:
    counts = tuple(sorted({int(r) for r in ([rows] if isinstance(rows, int) else rows)}))
    if any(r < 1 for r in counts):
        raise ValueError(f"packed_linears: row counts must be >= 1, got {counts}")
    return counts


class packed_linears:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """``with packed_linears(model, rows): ...`` -- fp32 CPU ``nn.Linear`` layers under ``model`` multiply
    inputs with one of the row counts ``rows`` (after flattening the leading dims) by packed copies of
    their weights; other inputs use ``F.linear``. Packing is done once on entry (extra memory: with MKL,
    which packs for one row count, one copy per weight and row count; with oneDNN one per weight); the
    original forward is restored on exit. A no-op when no backend is available
    (:func:`packed_linear_backend`; ``backend`` overrides ``$VTW_PACKED_LINEAR``) or ``enabled`` is
    False. Inference only (no autograd).

    Row counts below ``PACKED_MIN_ROWS`` (4) are not packed: there the plain path is as fast
    (``benchmarks/bench_packed_linear.py``), except with oneDNN on layers of at least
    ``ONEDNN_SMALL_ROWS_MIN_WEIGHTS`` weights. ``packed_linears.of([(module, rows), ...])`` packs several
    modules with their own row counts; a linear reached through two of them gets the union (speculative
    decoding: the target's layers see ``rows x (gamma + 1)`` rows, its output head also the drafter's
    ``rows``)."""

    def __init__(self, module: nn.Module, rows: int | Iterable[int], enabled: bool = True,
                 backend: str | None = None) -> None:
        self.specs = [(module, _row_counts(rows))]
        self.backend = packed_linear_backend(backend) if enabled else None
        self.enabled = self.backend is not None
        self.patched: list[nn.Linear] = []

    @classmethod
    def of(cls, specs: Iterable[tuple[nn.Module, int | Iterable[int]]], enabled: bool = True,
           backend: str | None = None) -> packed_linears:
        out = cls(nn.Identity(), (), enabled, backend)  # an empty placeholder spec, replaced by the real ones
        out.specs = [(module, _row_counts(rows)) for module, rows in specs]
        return out

    def __enter__(self) -> packed_linears:
        if not self.enabled:
            return self
        wanted: dict[int, tuple[nn.Linear, set[int]]] = {}
        for module, rows in self.specs:
            for lin in module.modules():
                w = lin.weight if isinstance(lin, nn.Linear) else None
                if w is None or w.device.type != "cpu" or w.dtype != torch.float32 or "forward" in lin.__dict__:
                    continue
                wanted.setdefault(id(lin), (lin, set()))[1].update(
                    r for r in rows if packs_rows(self.backend, w.numel(), r))
        for lin, rows in wanted.values():
            if rows:
                try:
                    packed = self._pack(lin.weight.detach(), sorted(rows))
                except (RuntimeError, NotImplementedError) as err:  # a build or CPU the op does not support
                    warnings.warn(f"packed_linears: {self.backend} weight packing failed ({err}); "
                                  "decoding on F.linear (set VTW_PACKED_LINEAR to another backend or 0)", stacklevel=2)
                    self.__exit__(None, None, None)
                    return self
                lin.forward = self._packed_forward(lin, packed, self.backend)
                self.patched.append(lin)
        return self

    def _pack(self, weight: torch.Tensor, rows: list[int]) -> dict[int, torch.Tensor]:
        """Packed copies of ``weight`` (C_out, C_in) keyed by row count."""
        if self.backend == "mkl":  # MKL packs for one row count: a copy per count
            return {r: torch.ops.mkl._mkl_reorder_linear_weight(weight, r) for r in rows}
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows))  # one layout serves every count
        return dict.fromkeys(rows, blocked)

    @staticmethod
    def _packed_forward(lin: nn.Linear, packed: dict[int, torch.Tensor], backend: str):
        weight = lin.weight.detach()  # detached once: the hot path does no per-call autograd bookkeeping
        bias = None if lin.bias is None else lin.bias.detach()

        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])  # (rows, C_in) on the fast path
            pw = packed.get(flat.shape[0])
            if pw is None or x.dtype != torch.float32 or torch.is_grad_enabled():
                return F.linear(x, lin.weight, lin.bias)
            if backend == "mkl":
                out = torch.ops.mkl._mkl_linear(flat.contiguous(), pw, weight, bias, flat.shape[0])
            else:
                out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), pw, bias, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])  # (..., C_out)

        forward.packed_rows = tuple(sorted(packed))  # the row counts with a packed copy (introspection)
        forward.backend = backend
        return forward

    def __exit__(self, *exc) -> None:
        for lin in self.patched:
            del lin.forward
        self.patched.clear()


class KVCache(nn.Module):
    """Static KV cache (gpt-fast / LlamaGen): buffers (max_batch, n_kv_head, max_seq, head_dim).

    ``update(input_pos, k, v)`` writes ``k``/``v`` (B, Hkv, T, D) at sequence slots ``input_pos`` (T,)
    for the first ``B`` rows and returns the whole cache for those rows, (B, Hkv, max_seq, D). Slots are
    simply overwritten, so rolling back (speculative decoding) needs no copy: later writes replace
    rejected entries and the attention mask / ``kv_len`` hides anything beyond the current position.
    Buffers are non-persistent: they never enter a ``state_dict``.
    """

    def __init__(self, max_batch: int, max_seq: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shape = (max_batch, n_kv_head, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = k.shape[0]
        if b > self.max_batch:
            raise ValueError(f"KVCache: batch {b} > max_batch {self.max_batch}; call setup_caches with a larger batch")
        if input_pos.shape[0] != k.shape[2]:
            raise ValueError(f"KVCache: input_pos has {input_pos.shape[0]} positions but k has {k.shape[2]}")
        k_out, v_out = self.k_cache[:b], self.v_cache[:b]  # views: in-place writes land in the buffers
        start = _consecutive_start(input_pos)
        if start is not None:  # one run of slots (decode, prefill, verification): a plain strided copy
            t = k.shape[2]
            k_out.narrow(2, start, t).copy_(k)
            v_out.narrow(2, start, t).copy_(v)
        else:
            k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
            v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        return k_out, v_out


def _consecutive_start(input_pos: torch.Tensor) -> int | None:
    """``p0`` when ``input_pos`` is ``p0, p0 + 1, ...`` on the CPU (eager), else None.

    The KV-cache write then is a strided ``copy_`` into a slice: on this CPU ``index_copy_`` took 69 us
    per call at 16 rows x 768 channels (1.6 ms of a 48-ms GPT-B decode step), the copy under 10 us.
    """
    if input_pos.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    pos = input_pos.tolist()
    if not pos or pos[0] < 0:  # nothing to write, or a negative slot (index_copy_ rejects it; narrow would wrap)
        return None
    return pos[0] if pos == list(range(pos[0], pos[0] + len(pos))) else None


class Attention(nn.Module):
    """Multi-head attention with fused ``wqkv`` (no biases), RoPE, grouped KV heads and an optional cache.

    ``forward(x, freqs_cis, input_pos=None, mask=None, is_causal=False, kv_len=None)``
    - without a cache (``self.kv_cache is None``): attention over ``x`` itself; ``is_causal`` or ``mask``
      (bool, True = attend, broadcastable to (B, H, T, T)).
    - with a cache: k/v are written at ``input_pos`` and attention runs over cache slots ``[0, kv_len)``
      (default: the whole cache); ``mask`` must then cover (.., T, kv_len). ``mask=None`` with a cache means
      "attend to every slot < kv_len" (exact for one new token at position ``kv_len - 1``).
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if dim % n_head:
            raise ValueError(f"dim {dim} not divisible by n_head {n_head}")
        if n_head % n_kv_head:
            raise ValueError(f"n_head {n_head} not divisible by n_kv_head {n_kv_head}")
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        total = (n_head + 2 * n_kv_head) * self.head_dim
        dd = {"device": device, "dtype": dtype}
        self.wqkv = nn.Linear(dim, total, bias=False, **dd)
        self.wo = nn.Linear(dim, dim, bias=False, **dd)
        self.attn_dropout_p = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.kv_cache: KVCache | None = None
        self.fused_attn: bool = use_fused_attn()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False, kv_len: int | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.wqkv(x)  # (B, T, (H + 2 Hkv) D)
        v = qkv[..., q_size + kv_size:].view(b, t, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if freqs_cis is not None:  # q and k are adjacent: rotate both head groups in one call
            qk = qkv[..., : q_size + kv_size].view(b, t, self.n_head + self.n_kv_head, self.head_dim)
            q, k = apply_rotary_emb(qk, freqs_cis).split([self.n_head, self.n_kv_head], dim=2)
        else:
            q = qkv[..., :q_size].view(b, t, self.n_head, self.head_dim)  # (B, T, H, D)
            k = qkv[..., q_size: q_size + kv_size].view(b, t, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H|Hkv, T, D)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, Hkv, kv_len, D)
            is_causal = False  # causality over the cache is expressed by mask / kv_len
            if q.dtype != k.dtype:
                q = q.to(k.dtype)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        y = attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, fused=self.fused_attn)
        y = y.transpose(1, 2).reshape(b, t, self.dim)  # (B, T, C)
        return self.resid_dropout(self.wo(y.to(x.dtype)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x))``; ``out = h + feed_forward(ffn_norm(h))``."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, hidden_dim: int | None = None,
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout, resid_dropout, **dd)
        self.feed_forward = FeedForward(dim, hidden_dim, multiple_of, ffn_dim_multiplier, ffn_dropout, **dd)
        self.attention_norm = RMSNorm(dim, norm_eps, **dd)
        self.ffn_norm = RMSNorm(dim, norm_eps, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False, kv_len: int | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, input_pos, mask, is_causal, kv_len))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))
