"""Shared token-merging maths: bipartite matchings (ToMe, PiToMe), size-weighted merging and
proportional attention.

- ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv:2210.09461).
  Bipartite soft matching: A = even positions, B = odd positions, score = cos(k_a, k_b) on
  head-averaged keys; the r A-tokens with the highest best-match score merge into their best B.
- PiToMe: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
  NeurIPS 2024 (arXiv:2405.16148). Energy score (their Eq. 4 as implemented in the released code)

      E_i = 1/T * sum_j ELU(cos(k_i, k_j) - m, alpha=1)          (self-similarity included)

  High-energy tokens (many similar neighbours) are mergeable, low-energy (isolated) tokens are
  protected. "strict": the top-2r tokens by energy are split alternately into A and B and every A
  merges into its most similar B. "bsm": all tokens in energy order, A = even, B = odd, then
  ToMe's top-r selection.
- Size-weighted merge (both papers): x <- sum(s * x) / sum(s), s <- sum(s); proportional attention
  (ToMe Eq. 1): softmax(q k^T / sqrt(d) + log s).

A merge is represented by an *assignment*: for every input token the index of its output slot
(shape (B, N), long). Output slots are the surviving tokens in their original order, so the CLS
token (index 0, never a merge source) stays first and spatial order is preserved. Every fast
(vectorised) function has a ``*_ref`` loop implementation next to it, used as the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Merge:
    """Result of a matching. ``assign``: (B, N) output slot of every input token; ``num_out``: N - r;
    ``src``/``dst``: (B, r) input indices of the merged-away tokens and the tokens they merge into."""

    assign: Tensor
    num_out: int
    src: Tensor
    dst: Tensor


def assignment_from_pairs(num_tokens: int, src: Tensor, dst: Tensor) -> Merge:
    """Turn (src -> dst) pairs (B, r) into an assignment; dst must never be a src."""
    B, r = src.shape
    keep = torch.ones(B, num_tokens, dtype=torch.bool, device=src.device)
    keep.scatter_(1, src, False)
    slot = keep.long().cumsum(1) - 1  # (B, N) slot of each kept token, in original order
    assign = slot.scatter(1, src, slot.gather(1, dst))
    return Merge(assign=assign, num_out=num_tokens - r, src=src, dst=dst)


def merge_wavg(m: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge. x: (B, N, C), size: (B, N, 1) or None (all ones).
    Returns (x', size') with shapes (B, N - r, C), (B, N - r, 1)."""
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    idx = m.assign.unsqueeze(-1)  # (B, N, 1)
    total = x.new_zeros(B, m.num_out, C).scatter_add_(1, idx.expand(B, N, C), x * size)
    new_size = size.new_zeros(B, m.num_out, 1).scatter_add_(1, idx, size)
    return total / new_size, new_size


def merge_wavg_ref(m: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Loop reference for :func:`merge_wavg`."""
    B, N, C = x.shape
    size = torch.ones(B, N, 1, dtype=x.dtype) if size is None else size
    out = torch.zeros(B, m.num_out, C, dtype=torch.float64)
    s_out = torch.zeros(B, m.num_out, 1, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            j = int(m.assign[b, i])
            out[b, j] += x[b, i].double() * size[b, i].double()
            s_out[b, j] += size[b, i].double()
    return (out / s_out).to(x.dtype), s_out.to(size.dtype)


# ----------------------------------------------------------------------------------------------
# ToMe bipartite soft matching


def tome_match(metric: Tensor, r: int, class_token: bool = True) -> Merge | None:
    """ToMe bipartite soft matching. metric: (B, N, d) (head-averaged keys, CLS first if
    ``class_token``). Removes min(r, (N - protected) // 2) tokens; None when nothing merges."""
    B, N, _ = metric.shape
    r = min(r, (N - int(class_token)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, d), (B, Nb, d)
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        if class_token:
            scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # (B, Na)
        edge_idx = node_max.argsort(dim=-1, descending=True)[:, :r]  # (B, r) positions in A
        src = 2 * edge_idx
        dst = 2 * node_idx.gather(1, edge_idx) + 1
    return assignment_from_pairs(N, src, dst)


def tome_match_ref(metric: Tensor, r: int, class_token: bool = True) -> tuple[list, list]:
    """Loop reference: returns per-batch sets of (src, dst) pairs."""
    B, N, _ = metric.shape
    r = min(r, (N - int(class_token)) // 2)
    out = []
    for bi in range(B):
        cand = []
        for i in range(0, N, 2):
            if class_token and i == 0:
                continue
            best, best_j = -2.0, -1
            for j in range(1, N, 2):
                s = float(F.cosine_similarity(metric[bi, i].double(), metric[bi, j].double(), dim=0))
                if s > best:
                    best, best_j = s, j
            cand.append((best, i, best_j))
        cand.sort(key=lambda t: -t[0])
        out.append({(i, j) for _, i, j in cand[:r]})
    return out, r


# ----------------------------------------------------------------------------------------------
# PiToMe


def energy_score(metric: Tensor, margin: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """PiToMe energy. metric: (B, T, d) without CLS. Returns (E (B, T), cosine graph S (B, T, T))."""
    v = metric / metric.norm(dim=-1, keepdim=True)
    sim = v @ v.transpose(-1, -2)  # (B, T, T)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


def energy_score_ref(metric: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """Brute-force float64 energy: E_i = mean_j (S_ij - m if S_ij >= m else alpha (exp(S_ij - m) - 1))."""
    B, T, _ = metric.shape
    E = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            acc = 0.0
            for j in range(T):
                s = float(F.cosine_similarity(metric[b, i].double(), metric[b, j].double(), dim=0)) - margin
                acc += s if s >= 0 else alpha * (math.exp(s) - 1.0)
            E[b, i] = acc / T
    return E


def pitome_match(metric: Tensor, r: int, margin: float, class_token: bool = True,
                 bsm: bool = False, alpha: float = 1.0) -> Merge | None:
    """PiToMe matching. metric: (B, N, d) with CLS first if ``class_token`` (CLS never merges).
    ``r``: tokens to remove (clamped to T // 2). ``bsm=False``: strict PiToMe; ``True``:
    energy-ordered bipartite soft matching."""
    off = int(class_token)
    B, N, _ = metric.shape
    T = N - off
    r = min(r, T // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        energy, sim = energy_score(metric[:, off:].float(), margin, alpha)  # (B, T), (B, T, T)
        order = energy.argsort(dim=-1, descending=True)  # (B, T) most-similar first
        if bsm:
            a_idx, b_idx = order[:, 0::2], order[:, 1::2]
        else:
            merge_set = order[:, : 2 * r]
            a_idx, b_idx = merge_set[:, 0::2], merge_set[:, 1::2]  # (B, r) each
        sim_ab = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, T))  # (B, Na, T)
        sim_ab = sim_ab.gather(2, b_idx.unsqueeze(1).expand(-1, a_idx.shape[1], -1))  # (B, Na, Nb)
        node_max, node_idx = sim_ab.max(dim=-1)  # (B, Na)
        if bsm:
            top = node_max.argsort(dim=-1, descending=True)[:, :r]  # (B, r)
            src = a_idx.gather(1, top)
            dst = b_idx.gather(1, node_idx.gather(1, top))
        else:  # every A token merges
            src = a_idx
            dst = b_idx.gather(1, node_idx)
    return assignment_from_pairs(N, src + off, dst + off)


def pitome_match_ref(metric: Tensor, r: int, margin: float, class_token: bool = True,
                     bsm: bool = False) -> list[set]:
    """Loop reference for :func:`pitome_match` (per-batch sets of (src, dst) pairs)."""
    off = int(class_token)
    B, N, _ = metric.shape
    T = N - off
    r = min(r, T // 2)
    E = energy_score_ref(metric[:, off:], margin)
    out = []
    for b in range(B):
        order = sorted(range(T), key=lambda i: -float(E[b, i]))
        if bsm:
            A, Bs = order[0::2], order[1::2]
        else:
            A, Bs = order[: 2 * r][0::2], order[: 2 * r][1::2]
        cos = lambda i, j, b=b: float(F.cosine_similarity(metric[b, i + off].double(), metric[b, j + off].double(), dim=0))
        best = []
        for a in A:
            j = max(Bs, key=lambda bb: cos(a, bb))
            best.append((cos(a, j), a, j))
        if bsm:
            best.sort(key=lambda t: -t[0])
            best = best[:r]
        out.append({(a + off, j + off) for _, a, j in best})
    return out


# ----------------------------------------------------------------------------------------------
# Attention with proportional-attention bias


def attention(q: Tensor, k: Tensor, v: Tensor, size: Tensor | None = None, scale: float | None = None,
              fused: bool = True) -> Tensor:
    """softmax(q k^T * scale + log s) v. q, k, v: (B, H, N, D); size: (B, N, 1) or None.
    ``fused`` uses SDPA with a float mask; otherwise the explicit reference below."""
    if not fused:
        return attention_ref(q, k, v, size, scale)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, size: Tensor | None = None, scale: float | None = None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if size is not None:
        attn = attn + size.log().to(attn.dtype)[:, None, None, :, 0]
    return attn.softmax(dim=-1) @ v
