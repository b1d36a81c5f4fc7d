"""Acceptance rules for speculative decoding: greedy, exact rejection sampling, LANTERN / LANTERN++.

Papers:
- Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (arXiv 2211.17192);
  Chen et al., "Accelerating LLM Decoding with Speculative Sampling" (arXiv 2302.01318):
  accept a drafted token x ~ q with probability min(1, p(x)/q(x)); on rejection resample from
  norm((p - q)+). The output is distributed exactly as the target p (lossless).
- Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
  Decoding" (ICLR 2025, arXiv 2410.03355) and LANTERN++ (arXiv 2502.06352). Rules as in the
  official code (jadohu/LANTERN, ``models/ea_model_llamagen.py``; facts in
  ``shared/methods/ar_gen.md`` section 3(b)):

  * latent neighbourhood B_k(x) = the k codes nearest to x by L2 on the raw codebook vectors
    (x itself excluded), in proximity order;
  * prefix sums c_j = sum_{m<=j} p(B_k(x)[m]);
  * delta <= 1 (LANTERN, total-variation bound):   j* = max{j : c_j <= delta};
    delta  > 1 (LANTERN++, multiplicative bound lambda = delta): j* = max{j : c_j <= (lambda-1) p(x)};
    j* = 0 when no j qualifies;
  * relaxed target probability  p~(x) = p(x) + c_{j*}  (moving that mass onto x changes p by exactly
    TV = c_{j*} <= delta);
  * sampling: accept iff u <= p~(x) / q(x); on rejection resample from the residual
    norm((p - q)+) of the ORIGINAL p with the aggregated neighbours A = B_{j*}(x) removed (their mass
    was counted as x's, so they must not be drawn again; deterministic top-1 drafts: q = point mass at
    x). ``AcceptanceConfig(residual="official")`` reproduces the released code instead: q (resp. p)
    zeroed on the k+1 nearest neighbours whenever j* > 0, uniform if everything is zero. We do not
    default to it: with k close to V (k = 1000 clamped to V-1 on small codebooks) it zeroes the whole
    vocabulary, so every rejected top-1 draft is replaced by a uniformly random code (measured on the
    demo GPT: Frechet distance 113 against 21 for plain decoding), and with sampled drafts it
    resamples from p itself, which over-weights tokens the drafter likes;
  * greedy: accept iff argmax(p with p(x) replaced by p~(x)) == x; the correction / bonus token is
    argmax of the original p.

  delta = 0 is exact speculative decoding (we switch the relaxation off entirely, so that no
  zero-probability neighbour can trigger the neighbour-zeroing of the residual and break losslessness).

Everything is batched: probabilities are ``(B, V)`` or ``(B, G, V)`` and every row gets its own
result. The neighbour table is ``(V, k+1)`` integer indices (never a V x V table), built in row
blocks and cached on disk under a hash of the codebook.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from ar_gen.sampling import draw_categorical

Mode = Literal["greedy", "exact", "lantern"]


@dataclass
class AcceptanceConfig:
    """Which acceptance rule to use.

    ``mode``: "exact" (lossless rejection sampling; with greedy sampling settings it is exact greedy
    verification), "lantern" (relaxed), or "greedy" (argmax match, relaxed if lantern_delta > 0).
    """

    mode: Mode = "exact"
    lantern_k: int = 1000  # LANTERN default --lantern_k
    lantern_delta: float = 0.1  # LANTERN default; > 1 means LANTERN++'s multiplicative bound lambda
    residual: Literal["aggregated", "official"] = "aggregated"  # neighbours removed from the residual (see above)

    def __post_init__(self) -> None:
        if self.mode not in ("greedy", "exact", "lantern"):
            raise ValueError(f"acceptance mode must be greedy|exact|lantern, got {self.mode!r}")
        if self.residual not in ("aggregated", "official"):
            raise ValueError(f"residual must be 'aggregated' or 'official', got {self.residual!r}")
        if self.lantern_k < 0:
            raise ValueError(f"lantern_k must be >= 0, got {self.lantern_k}")
        if self.lantern_delta < 0:
            raise ValueError(f"lantern_delta must be >= 0, got {self.lantern_delta}")

    @property
    def relaxed(self) -> bool:
        return self.mode != "exact" and self.lantern_delta > 0 and self.lantern_k > 0


# ----------------------------------------------------------------------------------------------
# Latent-proximity neighbourhoods
# ----------------------------------------------------------------------------------------------


def latent_neighbours(codebook: torch.Tensor, k: int, block_size: int = 1024) -> torch.Tensor:
    """k nearest codes of every code by L2 on the raw codebook vectors, nearest first.

    codebook: (V, D) float.  Returns (V, k) int64; row x never contains x itself (diagonal = +inf as
    in LANTERN's ``generate_codebook``). Computed in blocks of ``block_size`` rows so the peak
    memory is block_size x V distances, never V x V.
    """
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be (V, D), got shape {tuple(codebook.shape)}")
    num_codes = codebook.shape[0]
    if not 0 < k <= num_codes - 1:
        raise ValueError(f"k must be in [1, V-1] = [1, {num_codes - 1}], got {k}")
    emb = codebook.detach().to(torch.float32)
    out = torch.empty(num_codes, k, dtype=torch.int64)
    for start in range(0, num_codes, block_size):
        stop = min(start + block_size, num_codes)
        dist = torch.cdist(emb[start:stop], emb, p=2)  # (b, V)
        rows = torch.arange(stop - start)
        dist[rows, rows + start] = float("inf")
        out[start:stop] = dist.topk(k, dim=1, largest=False, sorted=True).indices.cpu()
    return out


def latent_neighbours_ref(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """Reference (full V x V distance matrix, small V only): same contract as ``latent_neighbours``."""
    emb = codebook.detach().to(torch.float64)
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    return dist.argsort(dim=1, stable=True)[:, :k]


def codebook_hash(codebook: torch.Tensor) -> str:
    """sha256 over shape and float32 bytes of the codebook (identifies the tokenizer's codes)."""
    arr = codebook.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256(str(tuple(arr.shape)).encode())
    digest.update(arr.numpy().tobytes())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("VTW_CACHE", Path.home() / ".cache" / "vtw")) / "lantern_neighbours"


def load_or_build_neighbours(codebook: torch.Tensor, k: int, cache_dir: str | os.PathLike | None = None,
                             block_size: int = 1024) -> torch.Tensor:
    """(V, k) nearest-neighbour indices, computed once per codebook and cached on disk.

    The file ``nn_<hash>_k<k>.pt`` holds int16/int32 indices; a cached table with more columns for
    the same codebook is sliced instead of recomputed. Writes go to a temporary name then rename.
    """
    num_codes = codebook.shape[0]
    if k > num_codes - 1:
        raise ValueError(f"k={k} neighbours requested but the codebook has only {num_codes} codes")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = codebook_hash(codebook)
    candidates = sorted(folder.glob(f"nn_{key}_k*.pt"), key=lambda p: int(p.stem.rsplit("_k", 1)[1]))
    for path in candidates:
        if int(path.stem.rsplit("_k", 1)[1]) >= k:
            table = torch.load(path, weights_only=True)
            if table.shape[0] != num_codes:
                raise ValueError(f"neighbour cache {path} has {table.shape[0]} rows, codebook has {num_codes}")
            return table[:, :k].to(torch.int64)
    table = latent_neighbours(codebook, k, block_size=block_size)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.int16 if num_codes <= 2**15 else torch.int32
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".nn_", suffix=".tmp")
    os.close(fd)
    torch.save(table.to(dtype).contiguous(), tmp)
    os.replace(tmp, folder / f"nn_{key}_k{k}.pt")
    return table


class NeighbourTable:
    """The LANTERN neighbour table of one tokenizer: (V, k+1) indices (k for relaxation, +1 for the
    official residual rule's B_{k+1}(x))."""

    def __init__(self, indices: torch.Tensor, k: int):
        if indices.dim() != 2 or indices.shape[1] < k:
            raise ValueError(f"neighbour indices must be (V, >= k={k}), got {tuple(indices.shape)}")
        self.k = k
        self.indices = indices.to(torch.int64)

    @property
    def vocab_size(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def from_codebook(cls, codebook: torch.Tensor, k: int, cache_dir: str | os.PathLike | None = None
                      ) -> NeighbourTable:
        num_codes = codebook.shape[0]
        if k > num_codes - 1:
            warnings.warn(f"lantern_k={k} exceeds V-1={num_codes - 1}; using k={num_codes - 1}", stacklevel=2)
            k = num_codes - 1
        k_store = min(k + 1, num_codes - 1)
        return cls(load_or_build_neighbours(codebook, k_store, cache_dir), k)

    def to(self, device: torch.device | str) -> NeighbourTable:
        self.indices = self.indices.to(device)
        return self


# ----------------------------------------------------------------------------------------------
# Relaxed probability
# ----------------------------------------------------------------------------------------------


class Relaxed(NamedTuple):
    prob: torch.Tensor  # (...,) p~(x) = p(x) + c_{j*}
    mass: torch.Tensor  # (...,) c_{j*}: total-variation distance moved onto x
    j_star: torch.Tensor  # (...,) int64, length of the aggregated neighbour prefix


def relaxed_probability(p: torch.Tensor, x: torch.Tensor, table: NeighbourTable | None, delta: float
                        ) -> Relaxed:
    """p~(x) for a drafted token x.   p: (..., V) probabilities; x: (...) int64.  Returns (...) each."""
    px = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (...)
    if table is None or delta <= 0 or table.k == 0:
        zero = torch.zeros_like(px)
        return Relaxed(px, zero, torch.zeros_like(x))
    nbrs = table.indices[x][..., : table.k]  # (..., k)
    cum = p.gather(-1, nbrs).cumsum(-1)  # (..., k) c_j
    if delta <= 1.0:  # LANTERN: TV bound
        bound = torch.full_like(px, delta)
    else:  # LANTERN++: p~(x) <= lambda p(x)
        bound = (delta - 1.0) * px
    ok = cum <= bound.unsqueeze(-1)  # monotone in j, so the count is the longest admissible prefix
    j_star = ok.sum(-1)  # (...)
    mass = torch.where(j_star > 0, cum.gather(-1, (j_star - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1),
                       torch.zeros_like(px))
    return Relaxed(px + mass, mass, j_star)


def relaxed_probability_ref(p: torch.Tensor, x: int, neighbours: list[int], delta: float) -> tuple[float, float]:
    """Scalar reference for one (p, x): loops over the neighbour list. Returns (p~(x), mass)."""
    px = float(p[x])
    bound = delta if delta <= 1.0 else (delta - 1.0) * px
    mass = 0.0
    running = 0.0
    for idx in neighbours:
        running += float(p[idx])
        if running <= bound:
            mass = running
        else:
            break
    return px + mass, mass


# ----------------------------------------------------------------------------------------------
# Residual and chain verification
# ----------------------------------------------------------------------------------------------

ResidualFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, "NeighbourTable | None"],
                      torch.Tensor]


def _zero_neighbours(dist: torch.Tensor, x: torch.Tensor, j_star: torch.Tensor, table: NeighbourTable | None,
                     official: bool) -> torch.Tensor:
    """Zero ``dist`` (N, V) in place at x's aggregated neighbours B_{j*}(x) (``official``: at the k+1 nearest
    whenever j* > 0, the released code's rule). Rows with j* = 0 are untouched."""
    if table is None or not bool((j_star > 0).any()):
        return dist
    rows = torch.nonzero(j_star > 0).squeeze(-1)
    if official:
        nbrs = table.indices[x[rows]][:, : table.k + 1]  # (n, k+1)
        dist[rows.unsqueeze(-1), nbrs] = 0.0
        return dist
    nbrs = table.indices[x[rows]][:, : table.k]  # (n, k) in proximity order
    prefix = torch.arange(nbrs.shape[1], device=nbrs.device) < j_star[rows].unsqueeze(1)  # (n, k): B_{j*}(x)
    dist[rows.unsqueeze(-1).expand_as(nbrs)[prefix], nbrs[prefix]] = 0.0
    return dist


def _normalise(res: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows of ``res`` normalised; rows summing to zero take the (normalised) ``fallback`` row."""
    total = res.sum(-1, keepdim=True)
    tiny = torch.finfo(res.dtype).tiny
    fb = fallback / fallback.sum(-1, keepdim=True).clamp_min(tiny)
    return torch.where(total > 0, res / total.clamp_min(tiny), fb)


def lantern_residual(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, j_star: torch.Tensor,
                     table: NeighbourTable | None, official: bool = False) -> torch.Tensor:
    """Resampling distribution after rejecting x ~ q.   p, q: (N, V); x, j_star: (N,).  Returns (N, V).

    norm((p - q)+) with the aggregated neighbours B_{j*}(x) removed (falls back to norm((p - q)+) if
    that leaves nothing, then to p). ``official``: q(B_{k+1}(x)) <- 0 where j* > 0 first, uniform if all zero (the
    released LANTERN++ code). With no relaxation (j* = 0 everywhere) both are the lossless residual.
    """
    if official:
        q = _zero_neighbours(q.clone(), x, j_star, table, official=True)
        res = (p - q).clamp_min(0.0)
        return _normalise(res, torch.ones_like(res))
    plain = (p - q).clamp_min(0.0)
    res = _zero_neighbours(plain.clone(), x, j_star, table, official=False)
    return _normalise(res, torch.where(plain.sum(-1, keepdim=True) > 0, plain, p))


def point_mass_residual(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, j_star: torch.Tensor,
                        table: NeighbourTable | None, official: bool = False) -> torch.Tensor:
    """Residual after rejecting a deterministic (top-1) draft x, i.e. q = point mass at x (LANTERN's
    dynamic-tree rule, q(x) taken as 1): p(x) <- 0 and p(B_{j*}(x)) <- 0, renormalise (falls back to p
    without x, then to p). ``official``: p(B_{k+1}(x)) <- 0 where j* > 0, uniform if all zero. Without
    relaxation this is norm((p - delta_x)+), the lossless residual."""
    plain = p.clone()
    plain.scatter_(-1, x.unsqueeze(-1), 0.0)
    res = _zero_neighbours(plain.clone(), x, j_star, table, official)
    if official:
        return _normalise(res, torch.ones_like(res))
    return _normalise(res, torch.where(plain.sum(-1, keepdim=True) > 0, plain, p))


class ChainResult(NamedTuple):
    n_accepted: torch.Tensor  # (B,) int64, number of accepted drafted tokens (0..G)
    next_token: torch.Tensor  # (B,) int64, bonus (all accepted) or correction token
    relaxed_mass: torch.Tensor  # (B,) float, sum of c_{j*} over the accepted drafts
    accepted: torch.Tensor  # (B, G) bool, per-position accept decisions (before the prefix cut)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return draw_categorical(probs, generator)


def verify_chain(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, config: AcceptanceConfig,
                 table: NeighbourTable | None = None, generator: torch.Generator | None = None,
                 greedy: bool = False, residual_fn: ResidualFn = lantern_residual) -> ChainResult:
    """Verify a chain of G drafted tokens per row.

    p: (B, G+1, V) target probabilities at the G draft positions plus the bonus position.
    q: (B, G, V) drafter probabilities the drafts were sampled from, or None for deterministic (top-1)
    drafts: then q(x) = 1 and the point-mass residual applies (LANTERN's dynamic-tree rule).
    drafts: (B, G) int64.  ``greedy`` (or mode "greedy"): argmax verification.
    """
    batch, gamma = drafts.shape
    if p.shape[:2] != (batch, gamma + 1):
        raise ValueError(f"p must be (B, G+1, V) = ({batch}, {gamma + 1}, V), got {tuple(p.shape)}")
    greedy = greedy or config.mode == "greedy"
    delta = config.lantern_delta if config.relaxed else 0.0
    relax = relaxed_probability(p[:, :gamma], drafts, table if delta > 0 else None, delta)  # (B, G)
    if greedy:
        modified = p[:, :gamma].scatter(-1, drafts.unsqueeze(-1), relax.prob.unsqueeze(-1))  # (B, G, V)
        accepted = modified.argmax(-1) == drafts  # (B, G)
    else:
        if q is not None and q.shape[:2] != (batch, gamma):
            raise ValueError(f"q must be (B, G, V) = ({batch}, {gamma}, V), got {tuple(q.shape)}")
        qx = torch.ones_like(relax.prob) if q is None else q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, G)
        if q is None and residual_fn is lantern_residual:
            residual_fn = point_mass_residual
        if config.residual == "official" and residual_fn in (lantern_residual, point_mass_residual):
            residual_fn = functools.partial(residual_fn, official=True)
        u = torch.rand(batch, gamma, generator=generator, device=p.device, dtype=p.dtype)
        accepted = u * qx <= relax.prob  # u <= p~/q without dividing by a zero q
    prefix = accepted.to(torch.int64).cumprod(-1)  # (B, G), 1 while all accepted so far
    n_acc = prefix.sum(-1)  # (B,)
    mass = (relax.mass * prefix.to(relax.mass.dtype)).sum(-1)
    rows = torch.arange(batch, device=p.device)
    p_next = p[rows, n_acc]  # (B, V): the first rejected position, or the bonus position G
    if greedy:
        return ChainResult(n_acc, p_next.argmax(-1), mass, accepted)
    next_token = torch.empty(batch, dtype=torch.int64, device=p.device)
    full = n_acc == gamma
    if bool(full.any()):
        next_token[full] = _sample(p_next[full], generator)
    rej = ~full
    if bool(rej.any()):
        idx = n_acc[rej]
        rrows = rows[rej]
        res = residual_fn(p_next[rej], None if q is None else q[rrows, idx], drafts[rrows, idx],
                          relax.j_star[rrows, idx], table if delta > 0 else None)
        next_token[rej] = _sample(res, generator)
    return ChainResult(n_acc, next_token, mass, accepted)
