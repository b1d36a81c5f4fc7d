"""Quantizer library: exact hand-made cases, reference paths, STE gradients, EMA/restart, bit packing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tokenizers_img.quantizers import (
    BinaryQuantizer,
    MultiScaleResidualQuantizer,
    VectorQuantizer,
    bits_to_subtokens,
    nearest_code,
    nearest_code_ref,
    subtoken_bit_table,
    subtokens_to_bits,
)


def test_nearest_code_matches_reference():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(300, 6, generator=g), torch.randn(50, 6, generator=g)
    assert torch.equal(nearest_code(z, cb, chunk=64), nearest_code_ref(z, cb))


def test_vq_hand_made_case_and_loss():
    vq = VectorQuantizer(3, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.1, 0.0]]).t()[None]  # (1, 2, 3)
    out = vq(z)
    assert out.indices.tolist() == [[1, 2, 0]]
    zq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(out.quantized[0].t(), zq)
    mse = F.mse_loss(z[0].t(), zq)
    assert torch.allclose(out.loss, mse * 1.25)
    assert out.stats["usage"].item() == pytest.approx(1.0)
    assert out.stats["perplexity"].item() == pytest.approx(3.0, rel=1e-4)


def test_vq_l2norm_codes_are_unit_and_ste_gradient_flows():
    vq = VectorQuantizer(16, 4, l2_norm=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    assert out.indices.shape == (2, 3, 3) and out.indices.max() < 16
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    # embed(indices) reproduces the forward value (eval identity)
    assert torch.allclose(vq.embed(out.indices), out.quantized.detach(), atol=1e-6)


def test_vq_fp32_under_autocast():
    vq = VectorQuantizer(8, 4)
    z = torch.randn(2, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, vq(z).indices)


def test_legacy_beta_placement():
    z = torch.randn(1, 2, 5, requires_grad=True)
    a, b = VectorQuantizer(4, 2, beta=0.25), VectorQuantizer(4, 2, beta=0.25, legacy_beta=True)
    b.load_state_dict(a.state_dict())
    oa, ob = a(z), b(z)
    cb, cm = oa.stats["codebook_loss"], oa.stats["commit_loss"]
    assert torch.allclose(oa.loss, cb + 0.25 * cm) and torch.allclose(ob.loss, cm + 0.25 * cb)


def test_ema_and_restart_change_dead_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, use_ema=True, ema_decay=0.5, restart_dead=True, dead_after=2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0]] + [[-100.0, -100.0 - i] for i in range(7)]))
        vq.ema_embed_sum.copy_(vq.embedding.weight)
    vq.train()
    before = vq.embedding.weight.clone()
    z = torch.randn(4, 2, 4, 4) * 0.1 + 1.0  # all near (1, 1): only code 0 is hit
    vq(z)
    # EMA moved the used code towards the data
    assert not torch.equal(vq.embedding.weight[0], before[0])
    dead_before = vq.embedding.weight[1:].clone()
    vq(z)  # second forward without hits: codes 1..7 are marked dead (applied before the next forward)
    assert torch.allclose(vq.embedding.weight[1:], dead_before, atol=1e-2)  # EMA barely moves unused codes
    assert vq.apply_pending_restart() == 7
    # after dead_after=2 forwards without hits, codes 1..7 were restarted onto encoder outputs
    assert not torch.equal(vq.embedding.weight[1:], dead_before)
    assert (vq.embedding.weight[1:] - 1.0).abs().max() < 1.0
    assert vq.embedding.weight.grad is None


def test_restart_keeps_autograd_graph_valid():
    vq = VectorQuantizer(16, 2, l2_norm=True, restart_dead=True, dead_after=1).train()
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    for _ in range(3):  # restarts happen every step here; backward must still work
        out = vq(z)
        opt.zero_grad()
        (out.quantized.sum() + out.loss).backward()
        opt.step()
    assert z.grad is not None


def test_multiscale_shapes_roundtrip_and_drop_only_in_training():
    torch.manual_seed(0)
    msq = MultiScaleResidualQuantizer(32, 4, scales=(1, 2, 4), scale_drop_prob=1.0)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    msq.eval()
    out = msq(z)
    assert out.indices.shape == (2, 1 + 4 + 16) and out.indices.min() >= 0
    assert torch.allclose(msq.embed(out.indices), out.quantized, atol=1e-5)
    msq.train()
    out_t = msq(z)
    assert (out_t.indices == -1).any() and not (out_t.indices[:, :1] == -1).any()  # never the first scale
    out_t.quantized.sum().backward()
    assert z.grad.abs().sum() > 0


def test_multiscale_per_scale_codebooks_and_custom_lookup():
    calls = []

    def far_lookup(zf, cb):
        calls.append(cb.shape)
        return torch.zeros(zf.shape[0], dtype=torch.long)

    msq = MultiScaleResidualQuantizer(8, 3, scales=(1, 2), shared_codebook=False, lookup_fn=far_lookup).eval()
    assert len(msq.quantizers) == 2
    out = msq(torch.randn(1, 3, 2, 2))
    assert len(calls) == 2 and (out.indices == 0).all()


def test_multiscale_matches_manual_reference():
    torch.manual_seed(1)
    msq = MultiScaleResidualQuantizer(16, 2, scales=(1, 3), l2_norm=False).eval()
    z = torch.randn(1, 2, 3, 3)
    out = msq(z)
    vq = msq.quantizers[0]
    r1 = F.interpolate(z, size=(1, 1), mode="area")
    q1 = F.interpolate(vq.embed(nearest_code_ref(r1.flatten(2).transpose(1, 2)[0], vq.get_codebook())[None, :].view(1, 1, 1)),
                       size=(3, 3), mode="bicubic", align_corners=False)
    r2 = z - q1
    i2 = nearest_code_ref(r2.flatten(2).transpose(1, 2)[0], vq.get_codebook())
    ref = q1 + vq.embed(i2.view(1, 3, 3))
    assert torch.allclose(out.quantized, ref, atol=1e-5)
    assert out.indices[0, 1:].tolist() == i2.tolist()


@pytest.mark.parametrize("token_each,code_dim", [(1, 16), (2, 8), (2, 10), (2, 12)])
def test_bit_packing_exact_and_reversible(token_each, code_dim):
    g = torch.Generator().manual_seed(token_each * code_dim)
    bits = torch.randint(0, 2, (3, 5, token_each * code_dim), generator=g).float()
    sub = bits_to_subtokens(bits, token_each, code_dim)
    assert sub.shape == (3, 5, token_each) and sub.max() < 2**code_dim
    assert torch.equal(subtokens_to_bits(sub, code_dim), bits)
    # every id survives the other direction too
    ids = torch.randint(0, 2**code_dim, (7, token_each), generator=g)
    assert torch.equal(bits_to_subtokens(subtokens_to_bits(ids, code_dim), token_each, code_dim), ids)


def test_bit_packing_msb_first_hand_case():
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1]]).float()
    assert bits_to_subtokens(bits, 2, 8).tolist() == [[129, 3]]
    assert bits_to_subtokens(bits, 1, 16).tolist() == [[2**15 + 2**8 + 3]]
    table = subtoken_bit_table(3)
    assert table[5].tolist() == [1.0, 0.0, 1.0]
    for i, j in itertools.product(range(8), range(3)):
        assert table[i, j] == (i >> (2 - j)) & 1
    with pytest.raises(ValueError, match="token_each"):
        bits_to_subtokens(bits, 2, 10)


def test_binary_quantizer_ste_and_modes():
    torch.manual_seed(0)
    bq = BinaryQuantizer(6, code_weight=0.5)
    logits = torch.randn(2, 6, 3, 3, requires_grad=True)
    bq.eval()
    out = bq(logits)
    assert torch.equal(out.indices, (logits > 0).long())
    assert torch.allclose(out.quantized, out.indices.float())
    p = torch.sigmoid(logits)
    assert torch.allclose(out.loss, 0.5 * (p * (1 - p)).mean())
    out.quantized.sum().backward()
    assert torch.allclose(logits.grad, p * (1 - p), atol=1e-6)  # d sigmoid through the STE
    bq.train()
    sampled = torch.stack([bq(torch.zeros(1, 6, 8, 8)).indices.float().mean() for _ in range(20)]).mean()
    assert 0.4 < sampled < 0.6  # Bernoulli(0.5) in training
