"""Batched chain speculative decoding for visual AR models (EAGLE / LANTERN style), with statistics.

Papers: Leviathan et al. 2023 (arXiv 2211.17192), Chen et al. 2023 (arXiv 2302.01318) for the
draft-verify loop; Li et al., "EAGLE" (arXiv 2401.15077) for the feature-level drafter; Jang et al.,
"LANTERN" (ICLR 2025, arXiv 2410.03355) and LANTERN++ (arXiv 2502.06352) for relaxed acceptance
(rules in :mod:`ar_gen.acceptance`; facts in ``shared/methods/ar_gen.md`` section 3).

One iteration, for every row b of the batch at once (CFG: rows b and b+B are the cond / uncond
streams of image b and always receive the same tokens)::

    drafts d_1..d_G ~ q (drafter, CFG on its own logits, then the same warpers as the target)
    one target forward of [last, d_1, ..., d_G] at per-row positions P_b .. P_b+G over the KV cache
    p_1..p_{G+1} = softmax(warp(CFG(target logits)))
    verify_chain -> n_b accepted drafts + one bonus/correction token (per row)
    roll back: row b's cache is valid up to P_b + n_b + 1; stale slots are zeroed.

Rows advance by different amounts, so every cached model is driven with **per-row positions**
(``(rows, T)`` position tensors, a per-row causal mask over the static cache and per-row RoPE),
see :class:`ar_gen.spec_models.RowCachedGPT`. The original LANTERN code supports batch size 1 only.

Statistics (LANTERN's ``step_compression``): mean accepted length tau = mean over (row, iteration)
of (accepted drafts + 1), counted while the row still needed tokens; target forwards include the
prefill. Wall-clock covers drafting and verification and excludes tokenizer decode.

Sampling order (LlamaGen's ``sample``, also used by plain decoding in this workbench): CFG on raw
logits ``u + s (c - u)``, divide by temperature, top-k (ties at the k-th value kept), top-p (the
token that crosses p is kept), softmax. temperature 0 means greedy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from ar_gen.acceptance import AcceptanceConfig, NeighbourTable, verify_chain
from ar_gen.sampling import SamplingConfig, cfg_scale_at, draw_categorical, top_k_top_p_filter
from vision.layers import packed_linears

DRAFT_MODES = ("sample", "top1")


def cfg_scale_table(cfg: SamplingConfig, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_steps,) guidance scale of every token index (``ar_gen.sampling.cfg_scale_at``)."""
    return torch.tensor([cfg_scale_at(i, num_steps, cfg) for i in range(num_steps)], dtype=torch.float32,
                        device=device)


def guided_logits(logits: torch.Tensor, cfg: SamplingConfig, steps: torch.Tensor, num_steps: int,
                  scale_table: torch.Tensor | None = None) -> torch.Tensor:
    """Raw (rows, ..., V) logits -> (B, ..., V) guided logits, the CFG scale of each token index.

    ``steps`` (B, ...) token index each position predicts (its scale comes from ``cfg_scale_at``, so
    LlamaGen's cfg-interval and ELM's linear/cos schedules work per row and position).
    """
    if not cfg.uses_cfg:
        return logits.float()
    if cfg.cfg_schedule == "constant":
        scale: torch.Tensor | float = cfg.cfg_scale
    else:
        table = cfg_scale_table(cfg, num_steps, logits.device) if scale_table is None else scale_table
        scale = table[steps.clamp(0, num_steps - 1)].unsqueeze(-1)  # (B, ..., 1)
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def is_greedy(cfg: SamplingConfig) -> bool:
    return cfg.greedy or cfg.temperature == 0


def probs_from_guided(guided: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Guided logits (..., V) -> the distribution tokens are drawn from (``ar_gen.sampling`` order:
    temperature, top-k, top-p, softmax). Greedy: plain softmax (argmax unchanged; LANTERN's greedy mode
    relaxes this un-warped p)."""
    if is_greedy(cfg):
        return torch.softmax(guided, dim=-1)
    if cfg.temperature != 1.0:
        guided = guided / max(cfg.temperature, 1e-5)
    if 0 < cfg.top_k < guided.shape[-1] or cfg.top_p < 1.0:  # same result as the filter's no-op, minus a copy
        guided = top_k_top_p_filter(guided, cfg.top_k, cfg.top_p)
    return torch.softmax(guided, dim=-1)


def pick(probs: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(N, V) -> (N,) argmax (greedy) or one categorical draw."""
    if is_greedy(cfg):
        return probs.argmax(-1)
    return draw_categorical(probs, generator)


# ----------------------------------------------------------------------------------------------
# What the loop needs from the target and the drafter
# ----------------------------------------------------------------------------------------------


@dataclass
class StepSampler:
    """Turns raw (rows, ..., V) logits into the (B, ..., V) distribution for given token indices."""

    cfg: SamplingConfig
    num_steps: int
    generator: torch.Generator | None = None
    scale_table: torch.Tensor | None = None
    draft: str = "sample"  # "sample": x ~ q; "top1": deterministic drafts (q(x) = 1, LANTERN's tree rule)

    def guided(self, logits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.scale_table is None and self.cfg.uses_cfg and self.cfg.cfg_schedule != "constant":
            self.scale_table = cfg_scale_table(self.cfg, self.num_steps, logits.device)
        return guided_logits(logits, self.cfg, steps, self.num_steps, self.scale_table)

    def propose(self, logits: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafter logits (rows, V) -> draft (B,) and the distribution it was drawn from (None: top-1)."""
        guided = self.guided(logits, steps)
        if self.greedy or self.draft == "top1":
            return guided.argmax(-1), None
        q = probs_from_guided(guided, self.cfg)
        return self.pick(q), q

    def probs(self, logits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return probs_from_guided(self.guided(logits, steps), self.cfg)

    def pick(self, probs: torch.Tensor) -> torch.Tensor:
        return pick(probs, self.cfg, self.generator)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.cfg)


class CachedTarget(Protocol):
    """A target model driven with per-row positions (see ``ar_gen.spec_models.RowCachedGPT``)."""

    def setup(self, rows: int, max_seq: int) -> None: ...

    def prefill(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (rows,) -> logits (rows, V), hidden (rows, C) at the condition position 0."""

    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, positions (rows, T) -> logits (rows, T, V), hidden (rows, T, C)."""

    def rollback(self, valid_len: torch.Tensor) -> None:
        """Forget (zero) every cache slot >= valid_len[row]."""


class Drafter(Protocol):
    def setup(self, rows: int, max_seq: int) -> None: ...

    def start(self, labels: torch.Tensor, hidden0: torch.Tensor, first_token: torch.Tensor) -> None:
        """After the target prefill: labels (rows,), target hidden (rows, C) at position 0, token 0 (rows,)."""

    def draft(self, gamma: int, sampler: StepSampler, first_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> drafts (B, G) int64 and their sampling distributions q (B, G, V) (None for top-1 drafts);
        draft i is token index ``first_step + i``."""

    def commit(self, n_accepted: torch.Tensor, fed: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor,
               start_pos: torch.Tensor) -> None:
        """After verification (all (rows, ...)): n_accepted; fed = [last, d_1..d_G] (the verified chunk
        at target positions start_pos ..); new = [d_1..d_n, next, ...] (the tokens at start_pos+1 ..);
        hidden (rows, G+1, C) target hidden states of the chunk."""


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class SpecStats:
    mode: str
    gamma: int
    batch: int
    num_tokens: int
    target_forwards: int = 0  # batched target forward calls, prefill included
    drafter_forwards: int = 0
    iterations: int = 0
    mean_accepted_length: float = 0.0  # tau: tokens per verification (bonus included), LANTERN's step_compression
    accept_rate_per_depth: list[float] = field(default_factory=list)  # P(accept d_i | d_1..d_{i-1} accepted)
    relaxed_mass_per_token: float = 0.0  # mean c_{j*} over accepted drafts (TV mass moved)
    relaxed_mass_per_image: float = 0.0  # sum of c_{j*} per image (realised TV budget)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    draft_s: float = 0.0  # wall-clock inside drafter.draft (all iterations)
    verify_s: float = 0.0  # target forwards of the drafted chunks (prefill excluded)
    accept_s: float = 0.0  # target probabilities + acceptance rule (verify_chain)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SpecOutput:
    tokens: torch.Tensor  # (B, N) int64
    stats: SpecStats


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _double(x: torch.Tensor, use_cfg: bool) -> torch.Tensor:
    return torch.cat([x, x], dim=0) if use_cfg else x


def _decode_loop(target: CachedTarget, drafter: Drafter, labels: torch.Tensor, num_tokens: int, gamma: int,
                 acceptance: AcceptanceConfig, sampler: StepSampler, table: NeighbourTable | None,
                 generator: torch.Generator | None, null_class: int | None, use_cfg: bool):
    """Prefill, then draft / verify / roll back until every row has ``num_tokens`` tokens.
    Returns (seq (B, N+G+1), stats, history of (n_accepted, active, relaxed mass) per iteration)."""
    batch = labels.shape[0]
    device = labels.device
    all_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if use_cfg else labels

    logits0, hidden0 = target.prefill(all_labels)  # (rows, V), (rows, C)
    zeros = torch.zeros(batch, dtype=torch.int64, device=device)
    first = sampler.pick(sampler.probs(logits0, zeros))  # (B,)
    drafter.start(all_labels, hidden0, _double(first, use_cfg))
    stats = SpecStats(acceptance.mode, gamma, batch, num_tokens, target_forwards=1)

    seq = torch.zeros(batch, num_tokens + gamma + 1, dtype=torch.int64, device=device)
    seq[:, 0] = first
    lens = torch.ones(batch, dtype=torch.int64, device=device)  # tokens generated so far
    last = first
    arange = torch.arange(gamma + 1, device=device)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (n_acc, active, mass) per iteration
    clock = time.perf_counter
    while int(lens.min()) < num_tokens:
        t0 = clock()
        drafts, q = drafter.draft(gamma, sampler, lens)  # (B, G), (B, G, V); d_i is token index lens+i-1
        stats.drafter_forwards += gamma
        t1 = clock()
        fed = torch.cat([last.unsqueeze(1), drafts], dim=1)  # (B, G+1)
        start = lens  # target position of `last` (position 0 is the condition; token i sits at i+1)
        positions = start.unsqueeze(1) + arange  # (B, G+1); logits at position t predict token index t
        logits, hidden = target.forward_rows(_double(fed, use_cfg), _double(positions, use_cfg))
        stats.target_forwards += 1
        t2 = clock()
        p = sampler.probs(logits, positions)  # (B, G+1, V)
        res = verify_chain(p, q, drafts, acceptance, table, generator, greedy=sampler.greedy)
        t3 = clock()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.accept_s += t3 - t2
        n_acc = res.n_accepted
        active = lens < num_tokens  # rows that still needed tokens (statistics count only those)
        history.append((n_acc, active, res.relaxed_mass))
        # write accepted drafts + next token
        new = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)  # (B, G+1)
        new.scatter_(1, n_acc.unsqueeze(1), res.next_token.unsqueeze(1))
        keep = (arange.unsqueeze(0) <= n_acc.unsqueeze(1)) & active.unsqueeze(1)  # (B, G+1)
        dest = (lens.unsqueeze(1) + arange).clamp(max=seq.shape[1] - 1)
        seq.scatter_(1, dest, torch.where(keep, new, seq.gather(1, dest)))
        lens = torch.where(active, lens + n_acc + 1, lens)  # finished rows stay put (static batch)
        last = torch.where(active, res.next_token, last)
        # roll back: slots < start + n + 1 hold [cond, tokens fed so far]; the rest is stale
        target.rollback(_double(start + n_acc + 1, use_cfg))
        drafter.commit(_double(n_acc, use_cfg), _double(fed, use_cfg), _double(new, use_cfg), hidden,
                       _double(start, use_cfg))
        stats.iterations += 1
    return seq, stats, history


@torch.no_grad()
def speculative_generate(target: CachedTarget, drafter: Drafter, labels: torch.Tensor, num_tokens: int,
                         gamma: int = 4, acceptance: AcceptanceConfig | None = None,
                         sampling: SamplingConfig | None = None, table: NeighbourTable | None = None,
                         generator: torch.Generator | None = None, null_class: int | None = None,
                         draft: str = "sample", packed_weights: bool = True) -> SpecOutput:
    """Generate ``num_tokens`` image tokens per label with chain speculative decoding.

    labels (B,) class ids; with CFG (``sampling.cfg_scale != 1``) the uncond stream uses ``null_class``.
    Greedy sampling (``sampling.greedy`` or temperature 0) verifies by argmax. ``draft``: "sample"
    (x ~ q, accept with min(1, p~(x)/q(x)), residual norm((p - q)+): the acceptance probability is
    sum_x min(p~, q), far above p(top-1) on the flat distributions of visual AR) or "top1" (deterministic
    drafts, accept with min(1, p~(x)), LANTERN's dynamic-tree rule on a chain); both are lossless at
    delta = 0. Drafters that return no q (the n-gram table) are verified as top-1 drafts.
    ``packed_weights``: the fp32 CPU linears of target and drafter run on packed weights (MKL or oneDNN)
    for the row counts the loop uses (``packing(rows, gamma)`` of each model; :class:`vision.layers.packed_linears`),
    as plain decoding does. Returns tokens (B, N) and :class:`SpecStats`.
    """
    acceptance = acceptance or AcceptanceConfig("exact")
    sampling = sampling or SamplingConfig()
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if acceptance.relaxed and table is None:
        raise ValueError("LANTERN acceptance needs a NeighbourTable (from the tokenizer's codebook_embeddings())")
    use_cfg = sampling.uses_cfg
    if use_cfg and null_class is None:
        raise ValueError("CFG needs null_class (the label of the unconditional stream)")
    t0 = time.perf_counter()
    batch = labels.shape[0]
    rows = 2 * batch if use_cfg else batch
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {DRAFT_MODES}, got {draft!r}")
    sampler = StepSampler(sampling, num_tokens, generator, draft=draft)
    # finished rows keep running (static batch): chunk starts <= N+G, drafter positions <= N+3G
    max_seq = num_tokens + 3 * gamma + 2
    target.setup(rows, max_seq)
    drafter.setup(rows, max_seq)
    specs = [spec for model in (target, drafter) if hasattr(model, "packing") for spec in model.packing(rows, gamma)]
    with packed_linears.of(specs, enabled=packed_weights):
        seq, stats, history = _decode_loop(target, drafter, labels, num_tokens, gamma, acceptance, sampler,
                                           table, generator, null_class, use_cfg)
    stats.wall_s = time.perf_counter() - t0
    n_hist = torch.stack([h[0] for h in history]).cpu()  # (iters, B)
    act = torch.stack([h[1] for h in history]).cpu()
    mass = torch.stack([h[2] for h in history]).double().cpu() * act
    stats.mean_accepted_length = float((n_hist + 1)[act].float().mean()) if bool(act.any()) else 0.0
    depth = torch.arange(gamma).view(1, 1, -1)
    tried = (depth <= n_hist.unsqueeze(-1)) & act.unsqueeze(-1)  # (iters, B, G): d_i was tested
    accepted = tried & (depth < n_hist.unsqueeze(-1))
    stats.accept_rate_per_depth = (accepted.sum((0, 1)).float() / tried.sum((0, 1)).clamp(min=1).float()).tolist()
    stats.relaxed_mass_per_token = float(mass.sum()) / max(int(n_hist[act].sum()), 1)
    stats.relaxed_mass_per_image = float(mass.sum(0).mean())
    stats.tokens_per_s = batch * num_tokens / max(stats.wall_s, 1e-9)
    return SpecOutput(seq[:, :num_tokens], stats)
