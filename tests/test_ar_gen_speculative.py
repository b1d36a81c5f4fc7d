"""Speculative decoding loop on tiny random GPTs: greedy equality, cache roll-back, sampling law."""

from __future__ import annotations

import pytest
import torch

from ar_gen.acceptance import AcceptanceConfig, NeighbourTable, latent_neighbours
from ar_gen.eagle import EagleDrafter, eagle_config, load_eagle, save_eagle
from ar_gen.gpt import GPT, gpt_config
from ar_gen.sampling import SamplingConfig, generate
from ar_gen.spec_models import EagleDraftRunner, GPTDraftRunner, NGramDraftRunner, NGramTable, RowCachedGPT
from ar_gen.speculative import speculative_generate


def _gpt(seed: int, vocab: int = 24, block: int = 16, dim: int = 32, layers: int = 2, head_std: float = 0.5) -> GPT:
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-test", vocab_size=vocab, block_size=block, num_classes=4, dim=dim, n_layer=layers))
    torch.nn.init.normal_(model.output.weight, std=head_std)  # zero-init head would make every logit tie
    return model.eval()


def _eagle(target: GPT, seed: int) -> EagleDrafter:
    torch.manual_seed(seed)
    return EagleDrafter(eagle_config(target.config)).eval()


def test_row_cached_gpt_matches_full_forward() -> None:
    gpt = _gpt(0)
    labels = torch.tensor([1, 3, 4])  # 4 = null class
    tokens = torch.randint(0, 24, (3, 9), generator=torch.Generator().manual_seed(0))
    full = gpt(tokens, labels, return_hidden=True)  # logits (3, 10, V) for positions 0..9
    runner = RowCachedGPT(gpt)
    runner.setup(3, 16)
    logits0, hidden0 = runner.prefill(labels)
    # feed the rows in different chunkings: row-wise positions differ inside one call
    pos = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    la, ha = runner.forward_rows(tokens[:, :3], pos)
    lb, hb = runner.forward_rows(tokens[:, 3:9], pos[:, :1] + torch.arange(3, 9))
    logits = torch.cat([logits0.unsqueeze(1), la, lb], 1)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([hidden0.unsqueeze(1), ha, hb], 1), full.hidden, atol=1e-5, rtol=1e-4)


def test_rejected_positions_leave_no_trace_in_the_kv_cache() -> None:
    gpt = _gpt(1)
    labels = torch.tensor([0, 2])
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 24, (2, 3), generator=gen)
    junk = torch.randint(0, 24, (2, 5), generator=gen)
    after = torch.randint(0, 24, (2, 4), generator=gen)
    n_keep = torch.tensor([1, 4])  # row 0 keeps 1 of the 5 verified tokens, row 1 keeps 4

    spec = RowCachedGPT(gpt)
    spec.setup(2, 16)
    spec.prefill(labels)
    spec.forward_rows(prefix, torch.arange(1, 4).expand(2, -1))
    spec.forward_rows(junk, torch.arange(4, 9).expand(2, -1))  # a verification chunk
    spec.rollback(4 + n_keep)  # rows keep junk[:, :n]
    # next chunk starts right after each row's kept tokens
    pos_after = (4 + n_keep).unsqueeze(1) + torch.arange(4)
    logits_spec, _ = spec.forward_rows(after, pos_after)
    caches_spec = [(c.k_cache.clone(), c.v_cache.clone()) for c in spec.caches]

    for row in range(2):
        clean = RowCachedGPT(gpt)
        clean.setup(1, 16)
        clean.prefill(labels[row:row + 1])
        seq = torch.cat([prefix[row], junk[row, : n_keep[row]], after[row]]).unsqueeze(0)
        logits_clean, _ = clean.forward_rows(seq, torch.arange(1, 1 + seq.shape[1]).unsqueeze(0))
        torch.testing.assert_close(logits_spec[row], logits_clean[0, -4:], atol=1e-5, rtol=1e-4)
        end = 1 + seq.shape[1]
        for (k_s, v_s), c in zip(caches_spec, clean.caches):
            torch.testing.assert_close(k_s[row, :, :end], c.k_cache[0, :, :end], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(v_s[row, :, :end], c.v_cache[0, :, :end], atol=1e-6, rtol=1e-5)
            assert float(k_s[row, :, end:].abs().max()) == 0.0, "stale k of rejected drafts left in the cache"
            assert float(v_s[row, :, end:].abs().max()) == 0.0


@pytest.mark.parametrize("drafter_kind", ["same", "gpt", "eagle", "ngram"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_greedy_speculative_equals_greedy_plain(drafter_kind: str, cfg_scale: float) -> None:
    target = _gpt(2)
    labels = torch.tensor([0, 1, 2, 3])
    sampling = SamplingConfig(cfg_scale=cfg_scale, greedy=True)
    plain = generate(target, labels, sampling)
    if drafter_kind == "same":
        drafter = GPTDraftRunner(_gpt(2))
    elif drafter_kind == "gpt":
        drafter = GPTDraftRunner(_gpt(3, dim=16, layers=1))
    elif drafter_kind == "ngram":  # fitted on the target's own samples: a good drafter
        sample_labels = torch.arange(64) % 4
        samples = generate(target, sample_labels, SamplingConfig(cfg_scale=cfg_scale, temperature=0.5),
                           generator=torch.Generator().manual_seed(0))
        drafter = NGramDraftRunner(NGramTable.fit(samples, sample_labels, 24, 4))
    else:
        drafter = EagleDraftRunner(_eagle(target, 4), target)
    out = speculative_generate(RowCachedGPT(target), drafter, labels, 16, gamma=3,
                               acceptance=AcceptanceConfig("exact"), sampling=sampling, null_class=4)
    assert torch.equal(out.tokens, plain), (out.tokens, plain)
    if drafter_kind == "same":
        assert out.stats.mean_accepted_length > 3.5  # a perfect drafter: G+1 = 4 tokens per forward
        assert out.stats.target_forwards < 16
    # LANTERN greedy with delta = 0 is exact too
    table = NeighbourTable(latent_neighbours(torch.randn(24, 4), 8), k=8)
    out0 = speculative_generate(RowCachedGPT(target), drafter, labels, 16, gamma=3,
                                acceptance=AcceptanceConfig("lantern", 8, 0.0), sampling=sampling,
                                table=table, null_class=4)
    assert torch.equal(out0.tokens, plain)


def test_lantern_greedy_accepts_more_with_delta() -> None:
    target = _gpt(5, head_std=0.05)  # flat logits: ambiguous, as visual AR models are
    labels = torch.tensor([0, 1, 2, 3])
    sampling = SamplingConfig(cfg_scale=2.0, greedy=True)
    drafter = EagleDraftRunner(_eagle(target, 6), target)
    table = NeighbourTable(latent_neighbours(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)), 20), 20)
    base = speculative_generate(RowCachedGPT(target), drafter, labels, 16, 3, AcceptanceConfig("greedy", 20, 0.0),
                                sampling, table, null_class=4)
    relaxed = speculative_generate(RowCachedGPT(target), drafter, labels, 16, 3,
                                   AcceptanceConfig("greedy", 20, 0.5), sampling, table, null_class=4)
    assert relaxed.stats.mean_accepted_length > base.stats.mean_accepted_length
    assert relaxed.stats.relaxed_mass_per_token <= 0.5
    assert relaxed.stats.target_forwards < base.stats.target_forwards


def _two_token_pvalue(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Two-sample chi-square test of homogeneity over the first two tokens."""
    from scipy.stats import chi2

    obs_a = torch.bincount(a[:, 0] * vocab + a[:, 1], minlength=vocab * vocab).double()
    obs_b = torch.bincount(b[:, 0] * vocab + b[:, 1], minlength=vocab * vocab).double()
    keep = (obs_a + obs_b) >= 10
    table = torch.stack([obs_a[keep], obs_b[keep]])
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["top1", "sample"])
def test_exact_speculative_sampling_law_on_tiny_gpt(monkeypatch, draft: str) -> None:
    """Speculative (EAGLE drafter, CFG, top-k) vs plain sampling on a 6-code GPT; a broken residual fails."""
    import ar_gen.speculative as spec_mod

    vocab = 6
    target = _gpt(7, vocab=vocab, block=4, head_std=0.3)
    drafter = EagleDraftRunner(_eagle(target, 8), target)
    sampling = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=5)
    labels = torch.full((4000,), 1)
    plain = generate(target, labels, sampling, num_tokens=3, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        return speculative_generate(RowCachedGPT(target), drafter, labels, 3, gamma=2, sampling=sampling,
                                    generator=torch.Generator().manual_seed(0), null_class=4, draft=draft).tokens

    pvalue = _two_token_pvalue(run(), plain, vocab)
    assert pvalue > 1e-3, f"speculative sampling differs from plain sampling (p={pvalue:.2e})"
    good_verify = spec_mod.verify_chain
    monkeypatch.setattr(spec_mod, "verify_chain",
                        lambda *a, **k: good_verify(*a, **k, residual_fn=lambda p, q, x, j, t: p))
    pvalue = _two_token_pvalue(run(), plain, vocab)
    assert pvalue < 1e-6, f"a broken residual (resample from p) went unnoticed (p={pvalue:.2e})"


def test_eagle_save_load_round_trip(tmp_path) -> None:
    target = _gpt(9)
    drafter = _eagle(target, 10)
    save_eagle(drafter, tmp_path / "d")
    loaded, meta = load_eagle(tmp_path / "d")
    for k, v in drafter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(ValueError, match="does not exist"):
        load_eagle(tmp_path / "missing")
    other = _gpt(11, dim=48)
    with pytest.raises(ValueError, match="does not fit"):
        EagleDraftRunner(loaded, other)


@pytest.mark.parametrize("schedule", ["linear", "interval"])
def test_greedy_speculative_follows_cfg_schedules(schedule: str) -> None:
    target = _gpt(12)
    labels = torch.tensor([0, 3])
    sampling = SamplingConfig(cfg_scale=3.0, cfg_schedule=schedule, cfg_interval=5, greedy=True)
    plain = generate(target, labels, sampling)
    out = speculative_generate(RowCachedGPT(target), EagleDraftRunner(_eagle(target, 13), target), labels, 16,
                               gamma=4, sampling=sampling, null_class=4)
    assert torch.equal(out.tokens, plain)


@pytest.mark.parametrize("drafter_kind", ["gpt", "eagle"])
def test_ragged_rows_stay_inside_the_cache(drafter_kind: str) -> None:
    """Rows finish at different iterations and keep running; positions must stay inside the caches."""
    target = _gpt(14, head_std=0.05)
    labels = torch.arange(8) % 4
    table = NeighbourTable(latent_neighbours(torch.randn(24, 4, generator=torch.Generator().manual_seed(2)), 23), 23)
    drafter = GPTDraftRunner(_gpt(14, head_std=0.05)) if drafter_kind == "gpt" else EagleDraftRunner(
        _eagle(target, 15), target)
    for seed in range(3):
        out = speculative_generate(RowCachedGPT(target), drafter, labels, 16, gamma=6,
                                   acceptance=AcceptanceConfig("lantern", 23, 0.9),
                                   sampling=SamplingConfig(cfg_scale=1.5), table=table,
                                   generator=torch.Generator().manual_seed(seed), null_class=4)
        assert out.tokens.shape == (8, 16) and int(out.tokens.max()) < 24


def test_ngram_table_learns_a_deterministic_rule_and_round_trips() -> None:
    vocab, w = 11, 4
    gen = torch.Generator().manual_seed(0)
    tokens = torch.zeros(200, 16, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (200,), generator=gen)
    for i in range(1, 16):  # x_i = (left + 2 * up + 1) mod V
        left = tokens[:, i - 1] if i % w else torch.full((200,), vocab)
        up = tokens[:, i - w] if i >= w else torch.full((200,), vocab)
        tokens[:, i] = (left + 2 * up + 1) % vocab
    labels = torch.randint(0, 3, (200,), generator=gen)
    table = NGramTable.fit(tokens, labels, vocab, w)
    i = torch.arange(16)
    left = torch.where(i % w > 0, tokens.roll(1, 1), torch.full_like(tokens, vocab))[:, 1:]
    up = torch.where(i >= w, tokens.roll(w, 1), torch.full_like(tokens, vocab))[:, 1:]
    pred = table.lookup(labels.unsqueeze(1).expand(-1, 15).reshape(-1), left.reshape(-1), up.reshape(-1))
    assert torch.equal(pred, tokens[:, 1:].reshape(-1))
    again = NGramTable.from_state_dict(table.state_dict())
    assert torch.equal(again.lookup(labels, left[:, 3], up[:, 3]), tokens[:, 4])


def test_eagle_split_fc_step_matches_reference_forward() -> None:
    target = _gpt(5)
    drafter = _eagle(target, 6)
    torch.nn.init.normal_(drafter.fc.bias, std=0.3)  # a non-zero bias must land in the token table once
    tokens = torch.randint(0, 24, (3, 5), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5).expand(3, -1)
    tables = drafter.decode_tables(target.tok_embeddings.weight)
    assert tables.token.shape == (24, 32)
    with torch.no_grad():
        ref_runner, fast_runner = EagleDraftRunner(drafter, target, split_fc=False), EagleDraftRunner(drafter, target)
        outs = []
        for runner in (ref_runner, fast_runner):
            runner.setup(3, 16)
            outs.append(runner._step(tokens, hidden, positions))
        assert ref_runner.tables is None and fast_runner.tables is not None
        full = drafter(target.embed_tokens(tokens), hidden)  # uncached causal reference
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0], full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("drafter_kind", ["gpt", "eagle"])
def test_packed_weights_and_split_fc_do_not_change_greedy_speculative_tokens(drafter_kind: str) -> None:
    target = _gpt(7)
    labels = torch.tensor([0, 3, 1])
    sampling = SamplingConfig(cfg_scale=2.0, greedy=True)
    outs = []
    for fast in (False, True):
        if drafter_kind == "gpt":
            drafter = GPTDraftRunner(_gpt(8, dim=16, layers=1))
        else:
            drafter = EagleDraftRunner(_eagle(target, 9), target, split_fc=fast)
        out = speculative_generate(RowCachedGPT(target), drafter, labels, 16, gamma=3, sampling=sampling,
                                   null_class=4, packed_weights=fast)
        outs.append(out)
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].stats.target_forwards == outs[1].stats.target_forwards
    st = outs[1].stats  # the time split covers disjoint parts of the loop, so it adds up to less than the total
    parts = (st.draft_s, st.verify_s, st.accept_s)
    assert all(x > 0 for x in parts) and sum(parts) <= st.wall_s
    # the context manager restored every linear
    assert not any("forward" in m.__dict__ for m in target.modules() if isinstance(m, torch.nn.Linear))
