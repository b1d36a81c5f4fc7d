"""FLOP counting for compressed models: measured and analytic.

Measured: ``torch.utils.flop_counter.FlopCounterMode`` under ``sdpa_kernel(SDPBackend.MATH)`` (on
CPU the fused SDPA kernels count 0 FLOPs; the math backend decomposes into ``bmm``). It counts only
matmul-like ops (mm / addmm / bmm / conv / baddbmm) as 2*M*N*K: softmax, norms, elementwise ops,
sort / gather / scatter count 0. The similarity matmuls of ToMe / PiToMe / MustDrop *are* counted.

Analytic (per pre-norm ViT block with N tokens entering attention, N' leaving the merge, width C,
MLP width M): qkv 6NC^2 + scores and weighted sum 4N^2C + out-proj 2NC^2 + MLP 4N'CM; the
patch-embed conv 2 * N_patch * (3 p^2) * C and the head 2 * C * classes. Used as the cross-check of
the counter on the uncompressed model (they agree exactly there). For a Llama prefill (LLaVA's LM)
with n_l tokens in layer l: :func:`llama_prefill_flops`, the cross-check of every LLaVA arm, drops
included (the runner computes exactly these matmuls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """(total FLOPs, result) of ``fn(*args, **kwargs)`` counted with the math attention kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


def vit_block_flops(n_in: int, n_out: int, width: int, mlp_hidden: int) -> int:
    """Analytic FLOPs of one pre-norm ViT block for one image (attention at n_in, MLP at n_out)."""
    attn = 2 * n_in * width * 3 * width + 2 * 2 * n_in * n_in * width + 2 * n_in * width * width
    return attn + 2 * 2 * n_out * width * mlp_hidden


def conv_stem_flops(backbone: torch.nn.Module, img_size: tuple[int, int]) -> int:
    """Analytic FLOPs of the ``Conv2d`` layers of a sequential conv stem (2 * H_out * W_out * C_out * C_in/g * kh * kw)."""
    h, w = img_size
    total = 0
    for conv in (m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)):
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        total += 2 * h * w * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return total


def timm_vit_flops(model: torch.nn.Module, tokens_in: list[int] | None = None,
                   tokens_out: list[int] | None = None) -> int:
    """Analytic FLOPs for one image through a timm ``VisionTransformer`` (merge overhead excluded)."""
    C = model.embed_dim
    depth = len(model.blocks)
    grid = model.patch_embed.grid_size
    n_patch = grid[0] * grid[1]
    n = n_patch + model.num_prefix_tokens
    tokens_in = tokens_in or [n] * depth
    tokens_out = tokens_out or tokens_in
    p = model.patch_embed.proj.kernel_size
    in_ch = model.patch_embed.proj.in_channels
    total = 2 * n_patch * in_ch * p[0] * p[1] * C
    backbone = getattr(model.patch_embed, "backbone", None)  # hybrid ViT: a conv stem before the projection
    if backbone is not None:
        total += conv_stem_flops(backbone, model.patch_embed.img_size)
    for blk, a, b in zip(model.blocks, tokens_in, tokens_out):
        total += vit_block_flops(a, b, C, blk.mlp.fc1.out_features)
    if getattr(model.head, "out_features", None):
        total += 2 * C * model.head.out_features
    return total


def llama_layer_flops(n_query: int, n_key: int, hidden: int, kv_hidden: int, mlp_hidden: int) -> int:
    """Analytic FLOPs of one Llama decoder layer: projections (q, o at hidden; k, v at kv_hidden),
    attention scores/weighted sum (n_query x n_key), SwiGLU MLP (3 matrices)."""
    proj = 2 * n_query * hidden * (2 * hidden + 2 * kv_hidden)
    attn = 2 * 2 * n_query * n_key * hidden
    mlp = 2 * 3 * n_query * hidden * mlp_hidden
    return proj + attn + mlp


def llama_prefill_flops(tokens_per_layer: list[int], hidden: int, intermediate: int, heads: int, kv_heads: int,
                        vocab: int) -> int:
    """Analytic FLOPs of one sequence's Llama prefill where layer l sees ``tokens_per_layer[l]`` = n tokens
    (d = hidden, m = intermediate, d_kv = d * kv_heads / heads): q and o projections 4nd^2, k and v
    4nd d_kv, attention scores and weighted sum 4n^2 d, SwiGLU MLP 6ndm; plus the LM head at the last
    position, 2dV (the prefill only needs the next token's logits)."""
    d_kv = hidden * kv_heads // heads
    total = 2 * hidden * vocab
    for n in tokens_per_layer:
        total += 4 * n * hidden * hidden + 4 * n * hidden * d_kv + 4 * n * n * hidden + 6 * n * hidden * intermediate
    return total
