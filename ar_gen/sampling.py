"""Sampling for the image GPT: classifier-free guidance, guidance schedules, filtering, KV-cached loops.

Rules (fact sheet ``shared/methods/ar_gen.md`` 1(b) LlamaGen, 2(b) ELM):

* **CFG** runs cond and uncond rows in one doubled batch, **cond first** (rows ``[:B]``), uncond second
  (rows ``[B:]``), and combines *raw logits* before any temperature / filtering:
  ``logits = uncond + s_t * (cond - uncond)``. Both streams are fed the same sampled token. With
  ``cfg_scale == 1`` and a constant schedule the batch is not doubled at all (LlamaGen).
* **Schedules** for step ``t = 0 .. N-1`` (token index), maximum scale ``s``, ``r = (t+1)/N``:
  ``constant``: s; ``interval`` (LlamaGen ``--cfg-interval k``, on when k > -1): s while ``t == 0`` or ``t-1 <= k``, then 1
  (cond logits only; the batch stays doubled, as in LlamaGen); ``linear`` (ELM): ``1 + (s-1) r``;
  ``cos`` (ELM): ``1 + (s-1) sin(pi r / 2)``.
* **Order** (LlamaGen's ``sample``): CFG -> ``/ max(temperature, 1e-5)`` -> top-k -> top-p -> softmax ->
  one categorical draw per row (:func:`draw_categorical`: inverse CDF, one uniform per row, the same law
  as ``torch.multinomial(probs, 1)`` at a fraction of its cost for 16k-way rows). ``greedy`` (or
  temperature 0) takes the argmax of the guided logits.
  top-k keeps every logit ``>=`` the k-th largest (ties at the k-th value are kept); top-p sorts
  descending and drops entries whose cumulative probability *before* them already exceeds p (the token
  that crosses p and the top-1 are always kept). Note: HF warpers (LANTERN) use temperature -> top-p ->
  top-k instead; we follow LlamaGen.
* **Sub-tokens** (ELM, ``token_each > 1``): logits (B, token_each, V); filtering and sampling act on each
  head independently (per-head top-k), one multinomial draw per head.
* **Reproducibility**: every random draw takes the caller's ``torch.Generator``; the same seed, batch
  layout and settings reproduce the same tokens exactly.

Loops (gpt-fast / LlamaGen structure, built on :class:`ar_gen.gpt.GPT`'s cached forward):
``prefill(model, cond, sampling, step, generator)`` writes the prefix into the cache and samples token 0;
``decode_one_token(model, tok, pos, ...)`` feeds one token at ``pos`` and samples the next;
``decode_n_tokens`` loops it; :func:`generate` ties them together. Decode steps attend only to the
``pos + 1`` filled cache slots (``kv_len``), not the whole static cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vision.layers import packed_linears

__all__ = [
    "SamplingConfig",
    "apply_cfg",
    "cfg_scale_at",
    "decode_n_tokens",
    "decode_one_token",
    "draw_categorical",
    "generate",
    "prefill",
    "sample_from_logits",
    "top_k_top_p_filter",
]

SCHEDULES = ("constant", "interval", "linear", "cos")


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0  # s; 1.0 = no guidance (the batch is not doubled with the constant schedule)
    cfg_schedule: str = "constant"  # constant | interval | linear | cos
    cfg_interval: float = -1.0  # LlamaGen --cfg-interval (schedule "interval"); -1 = always on
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.cfg_schedule not in SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def uses_cfg(self) -> bool:
        """Whether the batch is doubled (any schedule with a scale != 1)."""
        return self.cfg_scale != 1.0


def cfg_scale_at(step: int, num_steps: int, cfg: SamplingConfig) -> float:
    """Guidance scale for token index ``step`` of ``num_steps`` (see the module docstring)."""
    s = cfg.cfg_scale
    if cfg.cfg_schedule == "constant":
        return s
    if cfg.cfg_schedule == "interval":
        if cfg.cfg_interval <= -1 or step == 0 or (step - 1) <= cfg.cfg_interval:  # LlamaGen: "> -1" enables it
            return s
        return 1.0
    r = (step + 1) / num_steps
    if cfg.cfg_schedule == "linear":
        return 1.0 + (s - 1.0) * r
    return 1.0 + (s - 1.0) * math.sin(math.pi * r / 2)  # cos schedule: 1 + (s-1) cos(-pi/2 + r pi/2)


def apply_cfg(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Doubled-batch logits (2B, ...) with cond rows first -> ``uncond + scale * (cond - uncond)`` (B, ...)."""
    if logits.shape[0] % 2:
        raise ValueError(f"CFG expects a doubled batch (cond rows then uncond rows), got {logits.shape[0]} rows")
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set filtered logits to -inf over the last dim (top-k first, then top-p); returns a new tensor."""
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
        remove[..., 0] = False  # always keep the top-1
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of (unnormalised, non-negative) ``probs`` (N, V) -> (N,) long, by inverse CDF:
    ``u ~ U[0, 1)``, index = first ``i`` with ``cdf[i] > u * cdf[-1]`` (float64 CDF). Zero-probability
    entries are never drawn. Equal in law to ``torch.multinomial(probs, 1)``, but uses one uniform per
    row instead of one exponential per entry (the multinomial kernel's cost on 16k-token vocabularies)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (N, V)
    if not bool((cdf[:, -1] > 0).all()):  # catches all-zero and NaN rows, as torch.multinomial does
        raise ValueError("draw_categorical: a row of probs sums to zero or is not finite")
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1)
    return idx.clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_from_logits(logits: torch.Tensor, cfg: SamplingConfig,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Guided logits (B, V) or (B, token_each, V) -> token ids (B,) or (B, token_each) (long)."""
    if cfg.greedy or cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_top_p_filter(logits / max(cfg.temperature, 1e-5), cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (B*token_each, V): one draw per (sub-)token head
    return draw_categorical(flat, generator).view(probs.shape[:-1])


def _guided(logits: torch.Tensor, doubled: bool, scale: float) -> torch.Tensor:
    return apply_cfg(logits, scale) if doubled else logits


@torch.no_grad()
def prefill(model, cond: torch.Tensor, cfg: SamplingConfig, num_steps: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Write the condition prefix (rows already doubled if CFG) into the cache; sample token 0 -> (B[, te])."""
    p = model.config.cls_token_num
    input_pos = torch.arange(p, device=cond.device)
    logits = model(None, cond, input_pos=input_pos, kv_len=p).logits[:, -1]  # (B', V) or (B', te, V)
    doubled = cfg.uses_cfg
    return sample_from_logits(_guided(logits, doubled, cfg_scale_at(0, num_steps, cfg)), cfg, generator)


@torch.no_grad()
def decode_one_token(model, tok: torch.Tensor, pos: int, cfg: SamplingConfig, step: int, num_steps: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Feed ``tok`` (B[, te]) at cache position ``pos`` (doubled for CFG) and sample the next token (B[, te])."""
    doubled = cfg.uses_cfg
    x = torch.cat([tok, tok]) if doubled else tok
    input_pos = torch.tensor([pos], device=tok.device)
    logits = model(x.unsqueeze(1), None, input_pos=input_pos, kv_len=pos + 1).logits[:, -1]
    return sample_from_logits(_guided(logits, doubled, cfg_scale_at(step, num_steps, cfg)), cfg, generator)


@torch.no_grad()
def decode_n_tokens(model, first: torch.Tensor, start_pos: int, num_new: int, cfg: SamplingConfig,
                    num_steps: int, generator: torch.Generator | None = None,
                    callback: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Decode ``num_new`` tokens after ``first`` (token index 0 at cache slot ``start_pos``)."""
    out, tok = [], first
    for i in range(num_new):
        tok = decode_one_token(model, tok, start_pos + i, cfg, i + 1, num_steps, generator)
        out.append(tok)
        if callback is not None:
            callback(i + 1)
    return out


@torch.no_grad()
def generate(model, cond: torch.Tensor, cfg: SamplingConfig | None = None, num_tokens: int | None = None,
             generator: torch.Generator | None = None, cond_null: torch.Tensor | None = None,
             callback: Callable[[int], None] | None = None, setup_caches: bool = True,
             packed_weights: bool = True) -> torch.Tensor:
    """Sample image tokens (B, N) or (B, N, token_each) for conditions ``cond`` (labels (B,) / captions).

    ``cond_null`` defaults to ``model.null_cond``. Caches are (re)allocated for the doubled batch unless
    ``setup_caches=False`` (then the caller's caches must be large enough). ``packed_weights`` runs the
    decode steps' linears on packed fp32 weights (:func:`vision.layers.packed_linears`: MKL on Intel, oneDNN
    elsewhere; same results as ``F.linear``, no effect on GPU, other dtypes or builds without either).
    """
    cfg = cfg or SamplingConfig()
    c = model.config
    n = c.block_size if num_tokens is None else num_tokens
    if not 1 <= n <= c.block_size:
        raise ValueError(f"num_tokens must be in [1, {c.block_size}], got {n}")
    b = cond.shape[0]
    if cfg.uses_cfg:
        null = model.null_cond(b, cond.device) if cond_null is None else cond_null
        cond = torch.cat([cond, null.to(cond.dtype)])  # (2B, ...): cond rows first
    if setup_caches:
        dtype = next(model.parameters()).dtype
        model.setup_caches(cond.shape[0], c.cls_token_num + n, dtype)
    was_training = model.training
    model.eval()  # no label / token dropout while sampling
    try:
        with packed_linears(model, rows=cond.shape[0], enabled=packed_weights):
            first = prefill(model, cond, cfg, n, generator)
            if callback is not None:
                callback(0)
            rest = decode_n_tokens(model, first, c.cls_token_num, n - 1, cfg, n, generator, callback)
    finally:
        model.train(was_training)
    return torch.stack([first, *rest], dim=1)  # (B, N[, te])
