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

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ar_gen.eagle import DecodeTables, EagleDrafter
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

    def zero_stale(self, stale: torch.Tensor, lo: int, hi: int) -> None:
        """Zero the slots [lo, hi) that ``stale`` (rows, 1, hi-lo, 1) marks (see :func:`stale_slots`)."""
        b = stale.shape[0]
        for buf in (self.k_cache, self.v_cache):
            buf[:b, :, lo:hi].masked_fill_(stale, 0.0)


def stale_slots(valid_len: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(rows,) valid lengths -> bool (rows, 1, hi-lo, 1): slot lo+i is stale for row b iff lo+i >= valid_len[b]."""
    slots = torch.arange(lo, hi, device=valid_len.device)
    return (slots.unsqueeze(0) >= valid_len.unsqueeze(1))[:, None, :, None]


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

    def packing(self, rows: int, gamma: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """Modules and the row counts their linears see in the loop: verification feeds G+1 tokens per row."""
        return [(self.gpt, (rows * (gamma + 1),))]

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
        stale = stale_slots(valid_len, lo, self.written_hi)  # computed once for every layer's cache
        for cache in self.caches:
            cache.zero_stale(stale, lo, self.written_hi)
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

    def to(self, device: torch.device | str) -> GPTDraftRunner:
        self.model.gpt.to(device)
        return self

    def setup(self, rows: int, max_seq: int) -> None:
        self.model.setup(rows, max_seq)

    def packing(self, rows: int, gamma: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
        return [(self.model.gpt, (rows, 2 * rows))]  # one token per draft step, two in the first

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
    own predicted feature with the drafted token. ``split_fc`` (default) runs the steps through
    :meth:`EagleDrafter.forward_tables` (fc's token half precomputed per code); False keeps the
    reference ``EagleDrafter.forward``.
    """

    def __init__(self, drafter: EagleDrafter, target: nn.Module, split_fc: bool = True):
        tc, dc = target.config, drafter.config
        if (tc.dim, tc.vocab_size, tc.grid_h, tc.grid_w) != (dc.dim, dc.vocab_size, dc.grid_h, dc.grid_w):
            raise ValueError(f"EAGLE drafter (dim={dc.dim}, vocab={dc.vocab_size}, grid={dc.grid_h}x{dc.grid_w}) "
                             f"does not fit the target (dim={tc.dim}, vocab={tc.vocab_size}, "
                             f"grid={tc.grid_h}x{tc.grid_w})")
        self.drafter = drafter.eval()
        self.target = target
        self.caches: list[RowKVCache] = []
        self.split_fc = split_fc  # False: the reference step (embedding lookup, concat, full fc)
        self.tables: DecodeTables | None = None  # fc split for decoding (EagleDrafter.decode_tables)
        self._tables_key: tuple | None = None
        self.pending_tokens: torch.Tensor | None = None  # (rows, M) x_{t+1}
        self.pending_hidden: torch.Tensor | None = None  # (rows, M, C) h_t
        self.pending_pos: torch.Tensor | None = None  # (rows, M) drafter index t
        self.pending_last: torch.Tensor | None = None  # (rows,) index of the last valid pending pair

    def to(self, device: torch.device | str) -> EagleDraftRunner:
        self.drafter.to(device)
        return self

    def setup(self, rows: int, max_seq: int) -> None:
        c = self.drafter.config
        param = next(self.drafter.parameters())
        self.caches = install_row_caches([self.drafter.layer], rows, max_seq, c.n_kv_head or c.n_head, c.head_dim,
                                         param.dtype, param.device)
        emb = self.target.tok_embeddings.weight
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (emb, self.drafter.fc.weight))
        if not self.split_fc:
            self.tables, self._tables_key = None, None
        elif key != self._tables_key:  # recomputed only when the weights changed
            self.tables, self._tables_key = self.drafter.decode_tables(emb), key

    def packing(self, rows: int, gamma: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """The drafter layer, its hidden-state fc and the shared head run on ``rows`` rows per draft step."""
        specs = [(self.drafter.layer, (rows,)), (self.target.output, (rows,))]
        return specs + ([(self.tables.hidden_fc, (rows,))] if self.tables is not None else [])

    def start(self, labels: torch.Tensor, hidden0: torch.Tensor, first_token: torch.Tensor) -> None:
        self.pending_tokens = first_token.unsqueeze(1)
        self.pending_hidden = hidden0.unsqueeze(1)
        self.pending_pos = torch.zeros_like(self.pending_tokens)
        self.pending_last = torch.zeros_like(first_token)

    def _step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv_len = int(positions.max()) + 1
        mask = row_mask(positions, kv_len)
        if self.tables is not None:  # fast path: fc's token half precomputed per code
            return self.drafter.forward_tables(self.tables, tokens, hidden, positions, mask=mask, kv_len=kv_len)
        return self.drafter(self.target.embed_tokens(tokens), hidden, positions, mask=mask, kv_len=kv_len)

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


NGRAM_ARCH = "ar_gen.spec_models.NGramTable"


class NGramTable:
    """Top-1 next-token table of a spatial n-gram model over raster token grids (a free drafter for CPUs).

    Context of token i (grid width w): (label, left = x[i-1], up = x[i-w]) with ``V`` standing for "none"
    (first column / first row). Lookup backs off (label, left, up) -> (left, up) -> (left) -> the most
    frequent token. Stored sparsely as sorted key / token arrays (never a V x V table).
    """

    def __init__(self, vocab_size: int, grid_w: int, tables: list[tuple[torch.Tensor, torch.Tensor]],
                 fallback: int):
        self.vocab_size, self.grid_w, self.tables, self.fallback = vocab_size, grid_w, tables, fallback

    @staticmethod
    def _keys(label: torch.Tensor, left: torch.Tensor, up: torch.Tensor, vocab: int) -> list[torch.Tensor]:
        v1 = vocab + 1
        return [(label * v1 + left) * v1 + up, left * v1 + up, left]

    @classmethod
    def fit(cls, tokens: torch.Tensor, labels: torch.Tensor, vocab_size: int, grid_w: int) -> NGramTable:
        """tokens (N, L) raster order, labels (N,) -> table of the most frequent next token per context."""
        n, length = tokens.shape
        tokens = tokens.long().cpu()
        idx = torch.arange(length)
        left = torch.where(idx % grid_w > 0, tokens.roll(1, dims=1), torch.full_like(tokens, vocab_size))
        up = torch.where(idx >= grid_w, tokens.roll(grid_w, dims=1), torch.full_like(tokens, vocab_size))
        lab = labels.long().cpu().unsqueeze(1).expand(n, length)
        tables = []
        for key in cls._keys(lab, left, up, vocab_size):
            pair = key.reshape(-1) * vocab_size + tokens.reshape(-1)
            uniq, counts = pair.unique(return_counts=True)
            k, t = uniq // vocab_size, uniq % vocab_size
            order = counts.argsort(descending=True, stable=True)
            order = order[k[order].argsort(stable=True)]  # grouped by key, most frequent first
            k, t = k[order], t[order]
            first = torch.ones_like(k, dtype=torch.bool)
            first[1:] = k[1:] != k[:-1]
            tables.append((k[first].contiguous(), t[first].contiguous()))
        fallback = int(torch.bincount(tokens.reshape(-1), minlength=vocab_size).argmax())
        return cls(vocab_size, grid_w, tables, fallback)

    def lookup(self, label: torch.Tensor, left: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(B,) contexts -> (B,) predicted tokens."""
        out = torch.full_like(left, self.fallback)
        found = torch.zeros_like(left, dtype=torch.bool)
        for key, (keys, toks) in zip(self._keys(label, left, up, self.vocab_size), self.tables):
            keys, toks = keys.to(left.device), toks.to(left.device)
            pos = torch.searchsorted(keys, key.contiguous()).clamp(max=keys.numel() - 1)
            hit = (keys[pos] == key) & ~found
            out = torch.where(hit, toks[pos], out)
            found = found | hit
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"meta": torch.tensor([self.vocab_size, self.grid_w, self.fallback])}
        for i, (k, t) in enumerate(self.tables):
            state[f"keys{i}"], state[f"tokens{i}"] = k, t
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.safetensors`` file (temp name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors.tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp, metadata={"arch": NGRAM_ARCH})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NGramTable:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as fh:
            arch = (fh.metadata() or {}).get("arch")
        if arch != NGRAM_ARCH:
            raise ValueError(f"{path}: not an n-gram drafter table (arch={arch!r})")
        return cls.from_state_dict(load_file(str(path)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> NGramTable:
        vocab, grid_w, fallback = (int(x) for x in state["meta"])
        tables = [(state[f"keys{i}"], state[f"tokens{i}"]) for i in range(3)]
        return cls(vocab, grid_w, tables, fallback)


class NGramDraftRunner:
    """Drafter (c), beyond the issue: spatial n-gram lookups (no network call per draft; CPU-friendly).
    Deterministic top-1 drafts, so verification uses LANTERN's q(x) = 1 rule (lossless at delta = 0)."""

    def __init__(self, table: NGramTable):
        self.table = table
        self.buf: torch.Tensor | None = None  # (B, max_seq) generated tokens (+ scratch drafts)
        self.labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> NGramDraftRunner:
        self.table.tables = [(k.to(device), t.to(device)) for k, t in self.table.tables]
        return self

    def setup(self, rows: int, max_seq: int) -> None:
        self.max_seq = max_seq

    def start(self, labels: torch.Tensor, hidden0: torch.Tensor, first_token: torch.Tensor) -> None:
        self.buf = torch.zeros(labels.shape[0], self.max_seq, dtype=torch.int64, device=labels.device)
        self.buf[:, 0] = first_token
        self.labels = labels

    @torch.no_grad()
    def draft(self, gamma: int, sampler: StepSampler, first_step: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch = first_step.shape[0]
        buf, w, vocab = self.buf[:batch], self.table.grid_w, self.table.vocab_size
        rows = torch.arange(batch, device=buf.device)
        labels = self.labels[:batch]
        drafts = []
        for i in range(gamma):
            idx = (first_step + i).clamp(max=buf.shape[1] - 1)  # token index being drafted
            left = torch.where(idx % w > 0, buf[rows, (idx - 1).clamp(min=0)], torch.full_like(idx, vocab))
            up = torch.where(idx >= w, buf[rows, (idx - w).clamp(min=0)], torch.full_like(idx, vocab))
            d = self.table.lookup(labels, left, up)
            buf[rows, idx] = d
            drafts.append(d)
        return torch.stack(drafts, 1), None

    def commit(self, n_accepted: torch.Tensor, fed: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor,
               start_pos: torch.Tensor) -> None:
        batch = self.buf.shape[0]
        n, new, start = n_accepted[:batch], new[:batch], start_pos[:batch]  # cond rows (uncond are copies)
        cols = (start.unsqueeze(1) + torch.arange(new.shape[1], device=new.device)).clamp(max=self.buf.shape[1] - 1)
        keep = torch.arange(new.shape[1], device=new.device).unsqueeze(0) <= n.unsqueeze(1)
        self.buf.scatter_(1, cols, torch.where(keep, new, self.buf.gather(1, cols)))
