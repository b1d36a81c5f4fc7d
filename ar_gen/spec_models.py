"""Per-row-position KV caching for speculative decoding, and the two drafter runners.

``ar_gen.gpt.GPT``'s cached forward takes one position vector shared by every row. In batched
speculative decoding each row accepts a different number of drafts, so rows sit at different
positions. :class:`RowCachedGPT` drives an unchanged ``GPT`` with (rows, T) positions:

* every layer's ``vision.layers.KVCache`` is replaced by :class:`RowKVCache`, whose ``update`` takes
  (rows, T) slots and scatters k/v row by row;
* RoPE is looked up per row (``freqs_cis[positions]`` (rows, T, D/2, 2), which ``apply_rotary_emb``
  accepts);
* the mask is per row: query (b, t) attends to cache slot j iff j <= positions[b, t];
* ``rollback(valid_len)`` zeroes every slot >= valid_len[b] that a verification wrote, so rejected
  drafts leave no trace.

It walks ``gpt.layers`` itself (embedding -> blocks -> norm -> head), using the GPT's own modules;
``tests/test_ar_gen_speculative.py`` checks it against ``GPT.forward``.

Drafter runners (the ``Drafter`` protocol of :mod:`ar_gen.speculative`):
* :class:`GPTDraftRunner`: a small independent GPT on the same tokenizer (its own cache and CFG).
* :class:`EagleDraftRunner`: the EAGLE one-layer drafter of :mod:`ar_gen.eagle`, reading the target's
  hidden states and sharing its embedding and head. Both apply CFG to their own logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ar_gen.eagle import EagleDrafter
from ar_gen.speculative import StepSampler
from vision.layers import KVCache, find_multiple


class RowKVCache(KVCache):
    """Static cache whose ``update`` writes row b's new k/v at its own slots ``input_pos[b]`` (rows, T)."""

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, d = k.shape  # (rows, Hkv, T, D)
        if input_pos.dim() == 1:
            input_pos = input_pos.unsqueeze(0).expand(b, -1)
        if b > self.max_batch:
            raise ValueError(f"RowKVCache: batch {b} > max_batch {self.max_batch}")
        index = input_pos[:, None, :, None].expand(b, h, t, d)  # (rows, Hkv, T, D)
        k_out, v_out = self.k_cache[:b], self.v_cache[:b]
        k_out.scatter_(2, index, k.to(k_out.dtype))
        v_out.scatter_(2, index, v.to(v_out.dtype))
        return k_out, v_out

    def zero_from(self, valid_len: torch.Tensor, lo: int, hi: int) -> None:
        """Zero slots j in [lo, hi) with j >= valid_len[row] (rows given by valid_len's length)."""
        b = valid_len.shape[0]
        slots = torch.arange(lo, hi, device=valid_len.device)
        stale = (slots.unsqueeze(0) >= valid_len.unsqueeze(1))[:, None, :, None]  # (rows, 1, hi-lo, 1)
        for buf in (self.k_cache, self.v_cache):
            view = buf[:b, :, lo:hi]
            view.masked_fill_(stale, 0.0)


def row_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(rows, T) positions -> bool (rows, 1, T, kv_len): slot j visible iff j <= position."""
    slots = torch.arange(kv_len, device=positions.device)
    return (slots.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)


def install_row_caches(layers: nn.ModuleList | list[nn.Module], rows: int, max_seq: int, n_kv_head: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device) -> list[RowKVCache]:
    caches = []
    for layer in layers:
        cache = RowKVCache(rows, find_multiple(max_seq, 8), n_kv_head, head_dim, dtype=dtype, device=device)
        layer.attention.kv_cache = cache
        caches.append(cache)
    return caches


class RowCachedGPT:
    """A class-conditional ``ar_gen.gpt.GPT`` driven with per-row positions (the ``CachedTarget`` protocol)."""

    def __init__(self, gpt: nn.Module):
        c = gpt.config
        if c.model_type != "c2i" or c.token_each != 1:
            raise ValueError("speculative decoding supports class-conditional single-token GPTs "
                             f"(got model_type={c.model_type!r}, token_each={c.token_each})")
        self.gpt = gpt.eval()
        self.caches: list[RowKVCache] = []
        self.written_hi = 0

    @property
    def config(self):
        return self.gpt.config

    def setup(self, rows: int, max_seq: int) -> None:
        c = self.gpt.config
        param = next(self.gpt.parameters())
        self.caches = install_row_caches(self.gpt.layers, rows, max_seq, c.n_kv_head or c.n_head, c.head_dim,
                                         param.dtype, param.device)
        self.written_hi = 0

    def release(self) -> None:
        self.gpt.clear_caches()
        self.caches = []

    def _run(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (rows, T, C) embeddings at positions (rows, T) -> logits (rows, T, V), hidden (rows, T, C)."""
        gpt = self.gpt
        n_pos = gpt.freqs_cis.shape[0]
        freqs = gpt.freqs_cis[positions.clamp(max=n_pos - 1)]  # (rows, T, D/2, 2); past-the-end drafts unused
        kv_len = int(positions.max()) + 1
        mask = row_mask(positions, kv_len)  # (rows, 1, T, kv_len)
        for layer in gpt.layers:
            h = layer(h, freqs, positions, mask=mask, kv_len=kv_len)
        self.written_hi = max(self.written_hi, kv_len)
        h = gpt.norm(h)
        return gpt.head(h), h

    @torch.no_grad()
    def prefill(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.gpt.embed_cond(labels)  # (rows, 1, C); eval mode: no label dropout
        positions = torch.zeros(labels.shape[0], 1, dtype=torch.int64, device=labels.device)
        logits, hidden = self._run(h, positions)
        return logits[:, 0], hidden[:, 0]

    @torch.no_grad()
    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(self.gpt.embed_tokens(tokens), positions)

    def rollback(self, valid_len: torch.Tensor) -> None:
        lo = int(valid_len.min())
        if lo >= self.written_hi:
            return
        for cache in self.caches:
            cache.zero_from(valid_len, lo, self.written_hi)
        self.written_hi = int(valid_len.max())


class GPTDraftRunner:
    """Drafter (a): a small independent GPT on the same tokenizer, its own per-row cache, CFG on its logits.

    Per round it feeds the two tokens at positions [start+n, start+n+1] (the last accepted one, whose
    k/v may be missing when all G drafts were accepted, and the new bonus/correction token), then G-1
    drafted tokens one at a time.
    """

    def __init__(self, gpt: nn.Module, null_class: int | None = None):
        self.model = RowCachedGPT(gpt)
        self.null_class = null_class
        self.pending_tokens: torch.Tensor | None = None  # (rows, M)
        self.pending_pos: torch.Tensor | None = None  # (rows, M)

    def setup(self, rows: int, max_seq: int) -> None:
        self.model.setup(rows, max_seq)

    def start(self, labels: torch.Tensor, hidden0: torch.Tensor, first_token: torch.Tensor) -> None:
        self.model.prefill(labels)
        self.pending_tokens = first_token.unsqueeze(1)  # token 0 sits at position 1
        self.pending_pos = torch.ones_like(self.pending_tokens)

    @torch.no_grad()
    def draft(self, gamma: int, sampler: StepSampler, first_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pending_tokens.shape[0]
        batch = first_step.shape[0]
        doubled = rows != batch
        logits, _ = self.model.forward_rows(self.pending_tokens, self.pending_pos)
        pos = self.pending_pos[:, -1]  # (rows,) position of the last fed token
        raw = logits[:, -1]  # (rows, V)
        drafts, qs = [], []
        for i in range(gamma):
            d, q = sampler.propose(raw, first_step + i)  # (B,), (B, V) or None
            drafts.append(d)
            qs.append(q)
            if i + 1 < gamma:
                pos = pos + 1
                tok = torch.cat([d, d]) if doubled else d
                logits, _ = self.model.forward_rows(tok.unsqueeze(1), pos.unsqueeze(1))
                raw = logits[:, 0]
        return torch.stack(drafts, 1), None if qs[0] is None else torch.stack(qs, 1)

    def commit(self, n_accepted: torch.Tensor, fed: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor,
               start_pos: torch.Tensor) -> None:
        last_acc = fed.gather(1, n_accepted.unsqueeze(1))  # (rows, 1) token at start+n
        nxt = new.gather(1, n_accepted.unsqueeze(1))  # (rows, 1) token at start+n+1
        self.pending_tokens = torch.cat([last_acc, nxt], dim=1)
        base = (start_pos + n_accepted).unsqueeze(1)
        self.pending_pos = torch.cat([base, base + 1], dim=1)
        self.model.rollback(start_pos + n_accepted)  # drafter slots >= start+n are rewritten next round


class EagleDraftRunner:
    """Drafter (b): EAGLE one-layer drafter on the target's hidden states (shared embedding and head).

    Pending pairs per row are the verified (token, target hidden) pairs not yet seen by the drafter;
    the first draft step processes them (padded to the longest row), later steps feed the drafter's
    own predicted feature with the drafted token.
    """

    def __init__(self, drafter: EagleDrafter, target: nn.Module):
        tc, dc = target.config, drafter.config
        if (tc.dim, tc.vocab_size, tc.grid_h, tc.grid_w) != (dc.dim, dc.vocab_size, dc.grid_h, dc.grid_w):
            raise ValueError(f"EAGLE drafter (dim={dc.dim}, vocab={dc.vocab_size}, grid={dc.grid_h}x{dc.grid_w}) "
                             f"does not fit the target (dim={tc.dim}, vocab={tc.vocab_size}, "
                             f"grid={tc.grid_h}x{tc.grid_w})")
        self.drafter = drafter.eval()
        self.target = target
        self.caches: list[RowKVCache] = []
        self.pending_tokens: torch.Tensor | None = None  # (rows, M) x_{t+1}
        self.pending_hidden: torch.Tensor | None = None  # (rows, M, C) h_t
        self.pending_pos: torch.Tensor | None = None  # (rows, M) drafter index t
        self.pending_last: torch.Tensor | None = None  # (rows,) index of the last valid pending pair

    def setup(self, rows: int, max_seq: int) -> None:
        c = self.drafter.config
        param = next(self.drafter.parameters())
        self.caches = install_row_caches([self.drafter.layer], rows, max_seq, c.n_kv_head or c.n_head, c.head_dim,
                                         param.dtype, param.device)

    def start(self, labels: torch.Tensor, hidden0: torch.Tensor, first_token: torch.Tensor) -> None:
        self.pending_tokens = first_token.unsqueeze(1)
        self.pending_hidden = hidden0.unsqueeze(1)
        self.pending_pos = torch.zeros_like(self.pending_tokens)
        self.pending_last = torch.zeros_like(first_token)

    def _step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv_len = int(positions.max()) + 1
        emb = self.target.embed_tokens(tokens)
        return self.drafter(emb, hidden, positions, mask=row_mask(positions, kv_len), kv_len=kv_len)

    @torch.no_grad()
    def draft(self, gamma: int, sampler: StepSampler, first_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pending_tokens.shape[0]
        doubled = rows != first_step.shape[0]
        feats = self._step(self.pending_tokens, self.pending_hidden, self.pending_pos)  # (rows, M, C)
        idx = self.pending_last
        feat = feats[torch.arange(rows, device=feats.device), idx]  # (rows, C) predicts h at the next position
        pos = self.pending_pos.gather(1, idx.unsqueeze(1)).squeeze(1)  # (rows,)
        drafts, qs = [], []
        for i in range(gamma):
            d, q = sampler.propose(self.target.head(feat), first_step + i)  # (B,), (B, V) or None
            drafts.append(d)
            qs.append(q)
            if i + 1 < gamma:
                pos = pos + 1
                tok = torch.cat([d, d]) if doubled else d
                feat = self._step(tok.unsqueeze(1), feat.unsqueeze(1), pos.unsqueeze(1))[:, 0]
        return torch.stack(drafts, 1), None if qs[0] is None else torch.stack(qs, 1)

    def commit(self, n_accepted: torch.Tensor, fed: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor,
               start_pos: torch.Tensor) -> None:
        m = int(n_accepted.max()) + 1  # pairs t = start .. start+n: (x_{t+1} = new[:, t-start], h_t)
        self.pending_tokens = new[:, :m]
        self.pending_hidden = hidden[:, :m]
        self.pending_pos = start_pos.unsqueeze(1) + torch.arange(m, device=start_pos.device)
        self.pending_last = n_accepted.clone()
