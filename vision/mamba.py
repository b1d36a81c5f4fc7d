"""Mamba selective state-space layer with three scan paths, and TokenUnify's multi-directional variant.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752.
Multi-directional ("v3") variant for volumes: TokenUnify (arXiv 2405.16847) / SegMamba, whose Mamba
shares one input projection across a forward scan, a reversed scan and an interleaved-slice scan.
Modified from the structure of state-spaces/mamba ``mamba_simple.py`` / ``selective_scan_ref``
(https://github.com/state-spaces/mamba); no code copied.

Selective scan (per channel d, state n; Eq. 2a/2b of the paper, ZOH for A, Euler for B):

    dA_t = exp(delta_t[d] * A[d, n])                    (discretised decay, A < 0)
    h_t  = dA_t * h_{t-1} + delta_t[d] * B_t[n] * u_t[d]
    y_t  = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    out  = y * SiLU(z)

Shapes (mamba-ssm convention):

    u, delta, z : (B, D, L)    A : (D, N)    B, C : (B, N, L)    D : (D,)    out : (B, D, L)

Three paths behind :func:`selective_scan` (``mode``):

- ``"ref"``: :func:`selective_scan_ref`, a readable sequential loop in fp32; the test oracle.
- ``"chunked"``: :class:`ChunkedSelectiveScan`, a custom autograd function. The sequence is cut into
  chunks of ``chunk`` steps; per chunk the (T, B, D, N) decays and inputs are built with vectorised
  ops, the recurrence runs as one in-place ``addcmul`` per step on a (B, D, N) state, and the state
  is passed to the next chunk. It never materialises (L, B, D, N) for the whole sequence; backward
  recomputes each chunk from its saved start state (memory O(L/T * B*D*N + T*B*D*N)).
- ``"cuda"``: mamba-ssm's fused kernel (``selective_scan_fn``) when the optional package imports
  and the tensors are on CUDA.

``mode="auto"`` picks cuda > chunked. The global default can be set with ``VTW_MAMBA_SCAN`` or
:func:`set_scan_mode`; a log line says when the fast path is off.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional CUDA kernels; cannot be imported without CUDA
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except (ImportError, OSError, RuntimeError):  # missing package / missing CUDA libs
    _mamba_ssm_scan = None

HAS_MAMBA_SSM = _mamba_ssm_scan is not None
SCAN_MODES = ("auto", "ref", "chunked", "cuda")
_SCAN_MODE = os.environ.get("VTW_MAMBA_SCAN", "auto")
_DEFAULT_CHUNK = int(os.environ.get("VTW_MAMBA_CHUNK", "64"))
_warned: set[str] = set()


def set_scan_mode(mode: str) -> None:
    """Global default for ``selective_scan(mode=None)``: one of ``auto, ref, chunked, cuda``."""
    global _SCAN_MODE
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    _SCAN_MODE = mode


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


# ------------------------------------------------------------------------------------------------------------
# Reference path
# ------------------------------------------------------------------------------------------------------------
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False):
    """Sequential selective scan in fp32 (the oracle). Shapes in the module docstring."""
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])  # (B, D, N)
    dA = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))  # (B, L, D, N)
    dBu = torch.einsum("bdl,bnl,bdl->bldn", delta, B, u)  # (B, L, D, N)
    ys = []
    for t in range(length):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))  # (B, D)
    y = torch.stack(ys, dim=2)  # (B, D, L)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------------------
# Chunked fast path (CPU and GPU, pure PyTorch)
# ------------------------------------------------------------------------------------------------------------
def _chunk_states(dl: torch.Tensor, ul: torch.Tensor, Bl: torch.Tensor, A: torch.Tensor, h0: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """States of one chunk. dl, ul: (T, B, D); Bl: (T, B, N); h0: (B, D, N) -> (dA, H) both (T, B, D, N)."""
    T, batch, dim = dl.shape
    n = A.shape[1]
    dA = torch.mul(dl.reshape(T * batch, dim, 1), A).exp_().view(T, batch, dim, n)  # (T, B, D, N)
    # delta*u*B as a batched outer product (bmm is much faster than a broadcast multiply on CPU);
    # H becomes the states in place
    H = torch.bmm((dl * ul).reshape(T * batch, dim, 1), Bl.reshape(T * batch, 1, n)).view(T, batch, dim, n)
    hs, das = H.unbind(0), dA.unbind(0)  # views, one per step
    hs[0].addcmul_(das[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(das[t], hs[t - 1])  # h_t = dA_t * h_{t-1} + dBu_t
    return dA, H


class ChunkedSelectiveScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C) without D skip / gate; all inputs fp32, sequence-first layout.

    Inputs: u, delta (L, B, D); A (D, N); B, C (L, B, N). Output y (L, B, D).
    Saves only the inputs and one (B, D, N) state per chunk; backward recomputes chunk states.
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, chunk: int):
        length, batch, dim = u.shape
        n = A.shape[1]
        h = u.new_zeros(batch, dim, n)
        starts = []
        y = torch.empty_like(u)
        for c0 in range(0, length, chunk):
            c1 = min(length, c0 + chunk)
            starts.append(h)
            _, H = _chunk_states(delta[c0:c1], u[c0:c1], Bm[c0:c1], A, h)
            T = c1 - c0
            # y_t[d] = sum_n H_t[d, n] C_t[n]  -> batched matmul over (T*B)
            y[c0:c1] = torch.bmm(H.view(T * batch, dim, n), Cm[c0:c1].reshape(T * batch, n, 1)).view(T, batch, dim)
            h = H[-1].clone()
        ctx.save_for_backward(u, delta, A, Bm, Cm, torch.stack(starts))
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, Bm, Cm, starts = ctx.saved_tensors
        chunk = ctx.chunk
        length, batch, dim = u.shape
        n = A.shape[1]
        dy = dy.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(Bm), torch.empty_like(Cm)
        ones_n = u.new_ones(n, 1)
        # (T, B, D, N) running sum of P * delta over chunks; reduced to dA_param once at the end
        acc = u.new_zeros(min(chunk, length), batch, dim, n)
        carry = u.new_zeros(batch, dim, n)  # dL/dh_{last of chunk} flowing back from later chunks
        chunk_starts = list(range(0, length, chunk))
        for ci in reversed(range(len(chunk_starts))):
            c0 = chunk_starts[ci]
            c1 = min(length, c0 + chunk)
            T = c1 - c0
            dl, ul, Bl, Cl, dyl = delta[c0:c1], u[c0:c1], Bm[c0:c1], Cm[c0:c1], dy[c0:c1]
            h0 = starts[ci]
            dA, H = _chunk_states(dl, ul, Bl, A, h0)
            # dC_t[n] = sum_d dy_t[d] H_t[d, n]
            dC[c0:c1] = torch.bmm(dyl.reshape(T * batch, 1, dim), H.view(T * batch, dim, n)).view(T, batch, n)
            # G_t = dL/dh_t = dy_t C_t^T + dA_{t+1} * G_{t+1}
            G = torch.bmm(dyl.reshape(T * batch, dim, 1), Cl.reshape(T * batch, 1, n)).view(T, batch, dim, n)
            gs, das = G.unbind(0), dA.unbind(0)
            gs[T - 1].add_(carry)
            for t in range(T - 2, -1, -1):
                gs[t].addcmul_(das[t + 1], gs[t + 1])
            carry = das[0] * gs[0]
            # P_t = dL/d(delta_t * A) = G_t * h_{t-1} * dA_t, computed in place in dA
            dA.mul_(G)
            dA[1:].mul_(H[:-1])
            dA[0].mul_(h0)
            P = dA
            acc[:T].addcmul_(P, dl.unsqueeze(-1))
            ddelta_l = torch.matmul(P.mul_(A), ones_n).view(T, batch, dim)  # (T, B, D): sum_n P * A
            # d(dBu_t) = G_t ; dBu = delta * u * B
            GB = torch.bmm(G.view(T * batch, dim, n), Bl.reshape(T * batch, n, 1)).view(T, batch, dim)
            ddelta[c0:c1] = torch.addcmul(ddelta_l, GB, ul)
            du[c0:c1] = GB * dl
            dB[c0:c1] = torch.bmm((dl * ul).reshape(T * batch, 1, dim), G.view(T * batch, dim, n)).view(T, batch, n)
        dA_param = acc.sum((0, 1))  # (D, N)
        return du, ddelta, dA_param, dB, dC, None


def _scan_blocked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
                  ) -> torch.Tensor:
    """Two-level blocked scan for small states (plain autograd): u, delta (L, B, D); B, C (L, B, N) -> (L, B, D).

    Used when L*B*D*N is small (e.g. the thin, long early stages of a 3D U-Net, d_inner 16 and L 12800),
    where one op per time step would be all Python overhead. The sequence is viewed as (nc, T) blocks with
    T ~ sqrt(L); the recurrence runs over T for all blocks at once, block carries are passed over nc, and
    each block is corrected with its cumulative decay: O(T + nc) ops on (L, B, D, N) tensors.
    """
    length, batch, dim = u.shape
    n = A.shape[1]
    T = max(1, int(math.ceil(math.sqrt(length))))
    nc = int(math.ceil(length / T))
    pad = nc * T - length
    if pad:  # padded steps have delta = 0 (decay 1, no input) and come last: they change nothing
        u, delta = F.pad(u, (0, 0, 0, 0, 0, pad)), F.pad(delta, (0, 0, 0, 0, 0, pad))
        Bm, Cm = F.pad(Bm, (0, 0, 0, 0, 0, pad)), F.pad(Cm, (0, 0, 0, 0, 0, pad))
    dA = torch.exp(delta.unsqueeze(-1) * A).view(nc, T, batch, dim, n)  # (nc, T, B, D, N)
    dBu = ((delta * u).unsqueeze(-1) * Bm.unsqueeze(2)).view(nc, T, batch, dim, n)
    # unbind (not indexing in the loop): its backward is one stack, where T selects would each
    # scatter into a full-size zero tensor
    dAs, dBus = dA.unbind(1), dBu.unbind(1)
    hs, decay = [dBus[0]], [dAs[0]]
    for t in range(1, T):  # intra-block recurrence from a zero state, all blocks at once
        hs.append(torch.addcmul(dBus[t], dAs[t], hs[-1]))
        decay.append(decay[-1] * dAs[t])
    H = torch.stack(hs, 1)  # (nc, T, B, D, N)
    P = torch.stack(decay, 1)  # cumulative decay within each block
    h_last, p_last = hs[-1].unbind(0), decay[-1].unbind(0)  # (B, D, N) per block
    carries = [H.new_zeros(batch, dim, n)]
    for c in range(nc - 1):  # state entering block c+1
        carries.append(torch.addcmul(h_last[c], p_last[c], carries[-1]))
    H = torch.addcmul(H, P, torch.stack(carries).unsqueeze(1))
    y = torch.einsum("ctbdn,ctbn->ctbd", H, Cm.view(nc, T, batch, n)).reshape(nc * T, batch, dim)
    return y[:length]


_BLOCKED_MAX_NUMEL = int(os.environ.get("VTW_MAMBA_BLOCKED_MAX", str(1 << 23)))  # L*B*D*N up to 8M: blocked


def _scan_seq_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      chunk: int | None = None, blocked: bool | None = None) -> torch.Tensor:
    """Chunked scan on sequence-first tensors: u, delta, z (L, B, D); B, C (L, B, N) -> (L, B, D).

    ``blocked``: True -> :func:`_scan_blocked`, False -> :class:`ChunkedSelectiveScan`, None -> by size.
    """
    dtype_in = u.dtype
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    uf = u.float()
    length, batch, dim = u.shape
    if blocked is None:
        small_state = batch * dim * A.shape[1] < 4096 or length < 64
        blocked = length * batch * dim * A.shape[1] <= _BLOCKED_MAX_NUMEL and small_state
    if blocked:
        y = _scan_blocked(uf, delta, A.float(), B.float(), C.float())
    else:
        y = ChunkedSelectiveScan.apply(uf.contiguous(), delta.contiguous(), A.float(), B.float().contiguous(),
                                       C.float().contiguous(), int(chunk or _DEFAULT_CHUNK))  # (L, B, D)
    if D is not None:
        y = torch.addcmul(y, uf, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                           chunk: int | None = None, blocked: bool | None = None) -> torch.Tensor:
    """Chunked selective scan (fp32 inside). Same signature and shapes as :func:`selective_scan_ref`."""
    seq = lambda t: None if t is None else t.permute(2, 0, 1)  # (B, X, L) -> (L, B, X)
    y = _scan_seq_chunked(seq(u), seq(delta), A, seq(B), seq(C), D=D, z=seq(z), delta_bias=delta_bias,
                          delta_softplus=delta_softplus, chunk=chunk, blocked=blocked)
    return y.permute(1, 2, 0)  # (B, D, L)


def _resolve_mode(mode: str | None, is_cuda: bool) -> str:
    mode = mode or _SCAN_MODE
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    if mode in ("auto", "cuda") and HAS_MAMBA_SSM and is_cuda:
        return "cuda"
    if mode == "cuda":
        _warn_once("mamba-ssm CUDA kernels unavailable (package missing or tensors on CPU): "
                   "using the chunked PyTorch scan")
        return "chunked"
    if mode == "ref":
        _warn_once("Mamba fast scan is OFF: using the sequential fp32 reference scan (slow)")
        return "ref"
    return "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   mode: str | None = None, chunk: int | None = None) -> torch.Tensor:
    """Dispatch to the reference, chunked or mamba-ssm path (``mode``; default the global mode).

    mamba-ssm layout: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) -> (B, D, L).
    """
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    mode = _resolve_mode(mode, u.is_cuda)
    if mode == "cuda":
        return _mamba_ssm_scan(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), **kw)
    if mode == "ref":
        return selective_scan_ref(u, delta, A, B, C, **kw)
    return selective_scan_chunked(u, delta, A, B, C, chunk=chunk, **kw)


def selective_scan_seq(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       mode: str | None = None, chunk: int | None = None) -> torch.Tensor:
    """Same as :func:`selective_scan` on sequence-first tensors: u, delta, z (L, B, D); B, C (L, B, N)."""
    mode = _resolve_mode(mode, u.is_cuda)
    if mode == "chunked":
        return _scan_seq_chunked(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, chunk=chunk)
    bdl = lambda t: None if t is None else t.permute(1, 2, 0)  # (L, B, X) -> (B, X, L)
    y = selective_scan(bdl(u), bdl(delta), A, bdl(B), bdl(C), D=D, z=bdl(z), delta_bias=delta_bias,
                       delta_softplus=delta_softplus, mode=mode, chunk=chunk)
    return y.permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------------------
# Interleaved-slice permutation (TokenUnify "v3", nslices)
# ------------------------------------------------------------------------------------------------------------
def slice_permutation(length: int, nslices: int, device=None) -> torch.Tensor:
    """Gather index ``perm`` with ``x[..., perm]`` = interleaved order: position i*n + k <- k*Lc + i.

    The sequence is split into ``nslices`` contiguous chunks of length Lc = ceil(L / n) (the last may be
    shorter) and the chunks are interleaved element-wise. For L divisible by n this is TokenUnify's
    permutation; other lengths are allowed (no divisibility constraint).
    """
    lc = math.ceil(length / nslices)
    src = torch.arange(length, device=device)
    key = (src % lc) * nslices + (src // lc)  # target position rank for each source index
    return torch.argsort(key)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# ------------------------------------------------------------------------------------------------------------
# Mamba block
# ------------------------------------------------------------------------------------------------------------
@dataclass
class MambaConfig:
    d_model: int = 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" -> ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    bias: bool = False
    conv_bias: bool = True
    # TokenUnify v3: ("fwd", "bwd", "slice"); plain Mamba: ("fwd",)
    directions: tuple[str, ...] = field(default_factory=lambda: ("fwd",))
    nslices: int = 5  # interleaved-slice scan: TokenUnify fixes 5
    scan_mode: str | None = None  # None -> global default (VTW_MAMBA_SCAN / set_scan_mode)
    chunk: int | None = None  # chunk length of the chunked scan (None -> VTW_MAMBA_CHUNK, default 64)


_SUFFIX = {"fwd": ("", "A_log", "D"), "bwd": ("_b", "A_b_log", "D_b"), "slice": ("_s", "A_s_log", "D_s")}


class Mamba(nn.Module):
    """Mamba block: in_proj -> [per direction: causal depthwise conv, SiLU, x_proj -> (dt, B, C), scan + D skip,
    SiLU(z) gate] -> sum over directions -> out_proj. Input/output (B, L, d_model).

    Parameter names follow mamba-ssm / TokenUnify checkpoints (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
    ``D``, with ``_b`` / ``_s`` suffixes for the reversed and slice directions).
    """

    def __init__(self, cfg: MambaConfig | None = None, **kwargs):
        super().__init__()
        cfg = cfg or MambaConfig(**kwargs)
        if kwargs and cfg is not None and not isinstance(cfg, MambaConfig):
            raise TypeError("pass a MambaConfig or keyword arguments")
        bad = [d for d in cfg.directions if d not in _SUFFIX]
        if bad or not cfg.directions:
            raise ValueError(f"directions must be a non-empty subset of {tuple(_SUFFIX)}, got {cfg.directions}")
        self.cfg = cfg
        self.d_inner = cfg.expand * cfg.d_model
        self.dt_rank = math.ceil(cfg.d_model / 16) if cfg.dt_rank == "auto" else int(cfg.dt_rank)
        di, n = self.d_inner, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * di, bias=cfg.bias)
        for direction in cfg.directions:
            sfx, a_name, d_name = _SUFFIX[direction]
            self.add_module(f"conv1d{sfx}", nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1,
                                                      bias=cfg.conv_bias))
            self.add_module(f"x_proj{sfx}", nn.Linear(di, self.dt_rank + 2 * n, bias=False))
            dt_proj = nn.Linear(self.dt_rank, di, bias=True)
            self._init_dt(dt_proj)
            self.add_module(f"dt_proj{sfx}", dt_proj)
            # S4D-real init A = -(1..N); A_log and D kept in fp32 (mamba "Keep in fp32")
            a = torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1)  # (D, N)
            self.register_parameter(a_name, nn.Parameter(torch.log(a)))
            self.register_parameter(d_name, nn.Parameter(torch.ones(di)))
        self.out_proj = nn.Linear(di, cfg.d_model, bias=cfg.bias)
        self._perm_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _init_dt(self, dt_proj: nn.Linear) -> None:
        cfg = self.cfg
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _causal_conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Causal depthwise conv on sequence-first x (L, B, di): y_t = b + sum_k w_k * x_{t-K+1+k}."""
        k = conv.kernel_size[0]
        w = conv.weight[:, 0, :]  # (di, K)
        xp = F.pad(x, (0, 0, 0, 0, k - 1, 0))  # (L + K - 1, B, di), zeros in front
        length = x.shape[0]
        y = xp[k - 1:k - 1 + length] * w[:, k - 1]
        for j in range(k - 1):
            y = torch.addcmul(y, xp[j:j + length], w[:, j])
        return y if conv.bias is None else y + conv.bias

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, direction: str) -> torch.Tensor:
        """x, z: (L, B, d_inner) already in this direction's order -> y * SiLU(z): (L, B, d_inner)."""
        sfx, a_name, d_name = _SUFFIX[direction]
        x = F.silu(self._causal_conv(x, getattr(self, f"conv1d{sfx}")))  # (L, B, di)
        x_dbl = getattr(self, f"x_proj{sfx}")(x)  # (L, B, dt_rank + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        dt_proj = getattr(self, f"dt_proj{sfx}")
        delta = F.linear(dt, dt_proj.weight)  # (L, B, di), bias added inside the scan in fp32
        A = -torch.exp(getattr(self, a_name).float())  # (di, N)
        return selective_scan_seq(x, delta, A, Bm, Cm, D=getattr(self, d_name).float(), z=z,
                                  delta_bias=dt_proj.bias.float(), delta_softplus=True, mode=self.cfg.scan_mode,
                                  chunk=self.cfg.chunk)

    def _perm(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._perm_cache:
            perm = slice_permutation(length, self.cfg.nslices, device=device)
            self._perm_cache[key] = (perm, inverse_permutation(perm))
        return self._perm_cache[key]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, d_model) -> (B, L, d_model)."""
        # Sequence-first inside: every projection and the scan then work on contiguous (L, B, .) tensors.
        xz = self.in_proj(hidden.transpose(0, 1))  # (L, B, 2*di), shared by all directions
        x, z = xz.chunk(2, dim=-1)  # (L, B, di) each
        out = 0
        for direction in self.cfg.directions:
            if direction == "fwd":
                y = self._scan_direction(x, z, "fwd")
            elif direction == "bwd":
                y = self._scan_direction(x.flip(0), z.flip(0), "bwd").flip(0)
            else:
                perm, inv = self._perm(x.shape[0], x.device)
                y = self._scan_direction(x[perm], z[perm], "slice")[inv]
            out = out + y
        return self.out_proj(out.to(hidden.dtype)).transpose(0, 1)  # (B, L, d_model)


class MambaLayer(nn.Module):
    """TokenUnify/SegMamba MambaLayer on feature maps: (B, C, *spatial) -> LayerNorm -> Mamba -> same shape.

    Flattening is z-major raster (``(B, C, D, H, W) -> (B, D*H*W, C)``). Following TokenUnify there is no
    residual inside the layer unless ``residual=True``.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 directions: tuple[str, ...] = ("fwd", "bwd", "slice"), nslices: int = 5, residual: bool = False,
                 scan_mode: str | None = None, chunk: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(MambaConfig(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand,
                                       directions=tuple(directions), nslices=nslices, scan_mode=scan_mode, chunk=chunk))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        seq = x.reshape(b, c, -1).transpose(1, 2)  # (B, L, C), z-major raster order
        out = self.mamba(self.norm(seq))
        if self.residual:
            out = out + seq
        return out.transpose(1, 2).reshape(b, c, *spatial)
