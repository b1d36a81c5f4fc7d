"""Acceptance rules of speculative decoding (ar_gen/acceptance.py) on toy categorical models."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from ar_gen.acceptance import (
    AcceptanceConfig,
    NeighbourTable,
    lantern_residual,
    latent_neighbours,
    latent_neighbours_ref,
    load_or_build_neighbours,
    point_mass_residual,
    relaxed_probability,
    relaxed_probability_ref,
    verify_chain,
)


def _bigram(vocab: int, seed: int, sharp: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64), -1)


def _speculative_bigram(target: torch.Tensor, drafter: torch.Tensor, rows: int, length: int, gamma: int,
                        config: AcceptanceConfig, table=None, seed: int = 0, greedy: bool = False,
                        residual_fn=lantern_residual, top1: bool = False) -> tuple[torch.Tensor, float]:
    """Speculative generation of ``length`` tokens from a bigram target, start token 0, all rows at once.
    Returns the (rows, length) tokens and the mean accepted length (tokens per target call)."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.full((rows, length + gamma + 1), -1, dtype=torch.int64)
    lens = torch.zeros(rows, dtype=torch.int64)
    last = torch.zeros(rows, dtype=torch.int64)
    calls, produced = 0, 0
    while int(lens.min()) < length:
        prev, drafts, qs, ps = last, [], [], []
        for _ in range(gamma):
            q = drafter[prev]
            x = q.argmax(-1) if (greedy or top1) else torch.multinomial(q, 1, generator=gen).squeeze(-1)
            ps.append(target[prev])
            qs.append(q)
            drafts.append(x)
            prev = x
        ps.append(target[prev])
        drafts_t = torch.stack(drafts, 1)
        q_all = None if top1 else torch.stack(qs, 1)  # top-1 drafts: q = point mass (LANTERN's q(x) = 1)
        if top1 and residual_fn is lantern_residual:
            residual_fn = point_mass_residual
        res = verify_chain(torch.stack(ps, 1), q_all, drafts_t, config, table, gen,
                           greedy=greedy, residual_fn=residual_fn)
        new = torch.cat([drafts_t, torch.zeros(rows, 1, dtype=torch.int64)], 1)
        new[torch.arange(rows), res.n_accepted] = res.next_token
        for j in range(gamma + 1):
            write = (j <= res.n_accepted) & (lens + j < seq.shape[1])
            seq[write, (lens + j)[write]] = new[write, j]
        lens = lens + res.n_accepted + 1
        last = res.next_token
        calls += 1
        produced += int((res.n_accepted + 1).sum())
    return seq[:, :length], produced / (calls * rows)


def _joint_exact(target: torch.Tensor, length: int) -> torch.Tensor:
    vocab = target.shape[0]
    probs = target[0].clone()  # (V,)
    for _ in range(length - 1):
        last = torch.arange(probs.numel()) % vocab
        probs = (probs.unsqueeze(-1) * target[last]).reshape(-1)
    return probs


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor, vocab: int) -> float:
    code = torch.zeros(tokens.shape[0], dtype=torch.int64)
    for j in range(tokens.shape[1]):
        code = code * vocab + tokens[:, j]
    observed = torch.bincount(code, minlength=probs.numel()).double()
    expected = probs * tokens.shape[0]
    keep = expected >= 5  # pool rare cells so the chi-square approximation holds
    obs = torch.cat([observed[keep], observed[~keep].sum().reshape(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


VOCAB = 5


@pytest.mark.parametrize("top1", [False, True])
@pytest.mark.parametrize("gamma", [1, 3])
def test_exact_speculative_matches_target_distribution(gamma: int, top1: bool) -> None:
    target, drafter = _bigram(VOCAB, 1, 1.5), _bigram(VOCAB, 2, 1.5)
    tokens, tau = _speculative_bigram(target, drafter, rows=30000, length=3, gamma=gamma,
                                      config=AcceptanceConfig("exact"), top1=top1)
    pvalue = _chi2_pvalue(tokens, _joint_exact(target, 3), VOCAB)
    assert pvalue > 1e-3, f"speculative samples differ from the target (p={pvalue:.2e}, tau={tau:.2f})"
    assert tau > 1.0


def test_lantern_delta_zero_is_exact_even_with_zero_probability_neighbours() -> None:
    target, drafter = _bigram(VOCAB, 3, 1.5), _bigram(VOCAB, 4, 1.5)
    target = target.clone()
    target[:, -1] = 0.0  # zero-probability codes: c_j = 0 <= delta=0 must not trigger any relaxation
    target = target / target.sum(-1, keepdim=True)
    table = NeighbourTable(latent_neighbours(torch.randn(VOCAB, 3, generator=torch.Generator().manual_seed(0)),
                                             VOCAB - 1), k=VOCAB - 2)
    tokens, _ = _speculative_bigram(target, drafter, rows=30000, length=3, gamma=2,
                                    config=AcceptanceConfig("lantern", lantern_k=3, lantern_delta=0.0), table=table)
    assert _chi2_pvalue(tokens, _joint_exact(target, 3), VOCAB) > 1e-3


@pytest.mark.parametrize("top1", [False, True])
def test_broken_residual_is_caught_by_the_same_test(top1: bool) -> None:
    target, drafter = _bigram(VOCAB, 1, 1.5), _bigram(VOCAB, 2, 1.5)

    def broken(p, q, x, j_star, table):  # resample from p instead of norm((p - q)+)
        return p

    tokens, _ = _speculative_bigram(target, drafter, rows=30000, length=3, gamma=3,
                                    config=AcceptanceConfig("exact"), residual_fn=broken, top1=top1)
    pvalue = _chi2_pvalue(tokens, _joint_exact(target, 3), VOCAB)
    assert pvalue < 1e-6, f"a broken residual went unnoticed (p={pvalue:.2e})"


def test_sampled_drafts_accept_sum_min_p_q_top1_drafts_accept_p_of_the_draft() -> None:
    """Flat target, drafter equal to it: drafts sampled from q are always accepted (u q(x) <= p(x)), a
    deterministic top-1 draft only with probability p(x) = 1/V (why sampled drafts are the default)."""
    rows, vocab, gamma = 4000, 4, 1
    p = torch.full((rows, gamma + 1, vocab), 1.0 / vocab, dtype=torch.float64)
    q = p[:, :gamma].clone()
    gen = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, vocab, (rows, gamma), generator=gen)
    sampled = verify_chain(p, q, drafts, AcceptanceConfig("exact"), generator=gen)
    assert bool((sampled.n_accepted == gamma).all())
    top1 = verify_chain(p, None, drafts, AcceptanceConfig("exact"), generator=gen)
    rate = top1.n_accepted.double().mean().item()
    assert abs(rate - 1.0 / vocab) < 4 * (0.25 * 0.75 / rows) ** 0.5, rate  # binomial, 4 sigma


def test_lantern_relaxation_changes_the_distribution_and_accepts_more() -> None:
    target, drafter = _bigram(VOCAB, 1, 1.5), _bigram(VOCAB, 2, 1.5)
    table = NeighbourTable(latent_neighbours(torch.randn(VOCAB, 2, generator=torch.Generator().manual_seed(1)),
                                             VOCAB - 1), k=3)
    _, tau_exact = _speculative_bigram(target, drafter, 20000, 3, 3, AcceptanceConfig("exact"))
    tokens, tau_relaxed = _speculative_bigram(target, drafter, 20000, 3, 3,
                                              AcceptanceConfig("lantern", 3, 0.3), table=table)
    assert tau_relaxed > tau_exact
    assert _chi2_pvalue(tokens, _joint_exact(target, 3), VOCAB) < 1e-6


def test_greedy_speculative_equals_greedy_decoding() -> None:
    target, drafter = _bigram(12, 5, 3.0), _bigram(12, 6, 3.0)
    tokens, _ = _speculative_bigram(target, drafter, rows=1, length=20, gamma=4,
                                    config=AcceptanceConfig("greedy", lantern_delta=0.0), greedy=True)
    expected, last = [], 0
    for _ in range(20):
        last = int(target[last].argmax())
        expected.append(last)
    assert tokens[0].tolist() == expected


def test_relaxed_mass_never_exceeds_delta_and_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, k = 40, 12
    table = NeighbourTable(latent_neighbours(torch.randn(vocab, 4, generator=gen), k + 1), k=k)
    p = torch.distributions.Dirichlet(torch.full((vocab,), 0.3)).sample((400,))
    x = torch.randint(0, vocab, (400,), generator=gen)
    for delta in (0.01, 0.05, 0.1, 0.3, 1.0):
        out = relaxed_probability(p, x, table, delta)
        assert float(out.mass.max()) <= delta + 1e-7
        # total variation between p and p with the neighbourhood mass moved onto x equals the mass
        for row in range(0, 400, 37):
            nb = table.indices[x[row], : int(out.j_star[row])]
            moved = p[row].clone()
            moved[x[row]] += moved[nb].sum()
            moved[nb] = 0.0
            tv = 0.5 * (moved - p[row]).abs().sum()
            assert abs(float(tv) - float(out.mass[row])) < 1e-6
            ref_prob, ref_mass = relaxed_probability_ref(p[row], int(x[row]), table.indices[x[row], :k].tolist(),
                                                         delta)
            assert abs(ref_prob - float(out.prob[row])) < 1e-6 and abs(ref_mass - float(out.mass[row])) < 1e-6
        # longest prefix: one more neighbour would break the bound
        longer = out.j_star < k
        nxt = p.gather(-1, table.indices[x][:, :k]).cumsum(-1).gather(-1, out.j_star.clamp(max=k - 1).unsqueeze(-1))
        assert bool((nxt.squeeze(-1)[longer] > delta).all())


def test_lantern_plus_plus_multiplicative_bound() -> None:
    gen = torch.Generator().manual_seed(1)
    vocab, k = 30, 10
    table = NeighbourTable(latent_neighbours(torch.randn(vocab, 4, generator=gen), k), k=k)
    p = torch.distributions.Dirichlet(torch.full((vocab,), 0.5)).sample((300,))
    x = torch.randint(0, vocab, (300,), generator=gen)
    for lam in (2.0, 5.0, 20.0):
        out = relaxed_probability(p, x, table, lam)
        px = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        assert bool((out.prob <= lam * px + 1e-7).all())
        assert bool((out.mass > 0).any())


def test_residual_without_relaxation_is_p_minus_q() -> None:
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, 9, generator=gen), -1)
    q = torch.softmax(torch.randn(6, 9, generator=gen), -1)
    res = lantern_residual(p, q, torch.zeros(6, dtype=torch.int64), torch.zeros(6, dtype=torch.int64), None)
    ref = (p - q).clamp_min(0)
    torch.testing.assert_close(res, ref / ref.sum(-1, keepdim=True))


def test_residuals_remove_exactly_the_aggregated_neighbours_and_official_rule_differs() -> None:
    vocab = 6
    table = NeighbourTable(torch.tensor([[1, 2, 3, 4, 5]] * vocab), k=5)  # k = V-1: every other code
    p = torch.tensor([[0.30, 0.05, 0.04, 0.31, 0.20, 0.10]], dtype=torch.float64)
    x = torch.tensor([0])
    relaxed = relaxed_probability(p, x, table, delta=0.1)
    assert int(relaxed.j_star[0]) == 2 and abs(float(relaxed.mass[0]) - 0.09) < 1e-12  # 0.05 + 0.04 <= 0.1
    # top-1 draft rejected: x and its two aggregated neighbours leave, the rest keeps its proportions
    res = point_mass_residual(p, None, x, relaxed.j_star, table)
    torch.testing.assert_close(res, torch.tensor([[0, 0, 0, 0.31, 0.20, 0.10]], dtype=torch.float64) / 0.61)
    # the released code's rule zeroes the k+1 = 6 nearest, i.e. everything: a uniform correction token
    official = point_mass_residual(p, None, x, relaxed.j_star, table, official=True)
    torch.testing.assert_close(official, torch.full((1, vocab), 1 / vocab, dtype=torch.float64))
    # sampled draft: norm((p - q)+) without the aggregated neighbours
    q = torch.tensor([[0.50, 0.01, 0.01, 0.08, 0.30, 0.10]], dtype=torch.float64)
    res = lantern_residual(p, q, x, relaxed.j_star, table)
    expected = torch.tensor([[0, 0, 0, 0.23, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(res, expected / expected.sum())
    # official: q zeroed on every other code, so the residual is p without x (p(x) < q(x)), renormalised
    no_x = p.clone()
    no_x[0, 0] = 0.0
    torch.testing.assert_close(lantern_residual(p, q, x, relaxed.j_star, table, official=True), no_x / 0.7)
    with pytest.raises(ValueError, match="residual"):
        AcceptanceConfig("lantern", 5, 0.1, residual="k+1")


def test_neighbours_equal_brute_force_knn(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 8, generator=gen)
    fast = latent_neighbours(codebook, 17, block_size=64)
    ref = latent_neighbours_ref(codebook, 17)
    assert torch.equal(fast, ref)
    assert not bool((fast == torch.arange(300).unsqueeze(-1)).any())
    # cached on disk, keyed by the codebook: a second call loads (and slices a wider table)
    table = load_or_build_neighbours(codebook, 17, cache_dir=tmp_path)
    assert torch.equal(table, ref)
    assert len(list(tmp_path.glob("nn_*_k17.pt"))) == 1
    import ar_gen.acceptance as acc

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    orig = acc.latent_neighbours
    acc.latent_neighbours = fail
    try:
        assert torch.equal(load_or_build_neighbours(codebook, 5, cache_dir=tmp_path), ref[:, :5])
    finally:
        acc.latent_neighbours = orig
    other = load_or_build_neighbours(codebook + 1e-3, 5, cache_dir=tmp_path)  # different codebook: new file
    assert other.shape == (300, 5) and len(list(tmp_path.glob("nn_*.pt"))) == 2


def test_neighbour_table_clamps_k(tmp_path) -> None:
    with pytest.warns(UserWarning, match="exceeds"):
        table = NeighbourTable.from_codebook(torch.randn(10, 3), k=1000, cache_dir=tmp_path)
    assert table.k == 9 and table.indices.shape == (10, 9)


def test_verify_chain_batched_rows_independent() -> None:
    """Per-row results equal running each row alone (greedy, deterministic)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(3 * torch.randn(5, 4, 11, generator=gen), -1)
    drafts = torch.randint(0, 11, (5, 3), generator=gen)
    drafts[0] = p[0, :3].argmax(-1)  # row 0 accepts everything
    cfg = AcceptanceConfig("greedy", lantern_delta=0.0)
    res = verify_chain(p, None, drafts, cfg)
    assert int(res.n_accepted[0]) == 3 and int(res.next_token[0]) == int(p[0, 3].argmax())
    for row in range(5):
        one = verify_chain(p[row:row + 1], None, drafts[row:row + 1], cfg)
        assert int(one.n_accepted) == int(res.n_accepted[row])
        assert int(one.next_token) == int(res.next_token[row])
