"""vision.optim: Muon + AdamW in one optimizer, against torch.optim.Muon / torch.optim.AdamW."""

import io

import pytest
import torch

from vision.optim import MuonAdamW, newton_schulz5


@pytest.mark.parametrize("shape", [(64, 32), (32, 96)])
def test_newton_schulz_keeps_singular_vectors_and_flattens_singular_values(shape):
    torch.manual_seed(0)
    m = torch.randn(*shape)
    out = newton_schulz5(m)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    core = u.T @ out @ vh.T  # diagonal iff out shares m's singular vectors
    diag = torch.diagonal(core)
    assert (core - torch.diag(diag)).abs().max() < 1e-4
    # a well-conditioned Gaussian matrix: every singular value lands in Muon's ~[0.7, 1.1] band
    assert diag.min() > 0.6 and diag.max() < 1.2
    assert torch.linalg.svdvals(m).max() / torch.linalg.svdvals(m).min() > 2  # the input was not flat


def _grads(seed, shapes, steps):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]


def test_muon_group_equals_torch_muon_with_bf16_newton_schulz():
    torch.manual_seed(0)
    w = torch.randn(48, 24)
    mine_w, ref_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    mine = MuonAdamW([{"params": [mine_w], "muon": True}], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon([ref_w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for (grad,) in _grads(1, [(48, 24)], 6):
        mine_w.grad, ref_w.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
    assert torch.allclose(mine_w, ref_w, atol=1e-5), (mine_w - ref_w).abs().max()
    assert (mine_w - w).abs().max() > 1e-2  # it moved


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(16, 8), torch.randn(8)]
    mine_p = [p.clone().requires_grad_() for p in params]
    ref_p = [p.clone().requires_grad_() for p in params]
    mine = MuonAdamW([{"params": mine_p[:1], "weight_decay": 0.05}, {"params": mine_p[1:], "weight_decay": 0.0}],
                     lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": ref_p[:1], "weight_decay": 0.05}, {"params": ref_p[1:], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    for grads in _grads(2, [(16, 8), (8,)], 5):
        for a, b, grad in zip(mine_p, ref_p, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
    for a, b in zip(mine_p, ref_p):
        assert torch.allclose(a, b, atol=1e-6)


def test_split_orthogonalises_fused_blocks_separately():
    torch.manual_seed(0)
    fused = torch.randn(3 * 8, 8)
    p_fused, p_parts = fused.clone().requires_grad_(), [b.clone().requires_grad_() for b in fused.chunk(3)]
    opt_fused = MuonAdamW([{"params": [p_fused], "muon": True, "split": 3}], lr=0.01)
    opt_parts = MuonAdamW([{"params": p_parts, "muon": True}], lr=0.01)
    grad = torch.randn(24, 8)
    p_fused.grad = grad.clone()
    for p, g in zip(p_parts, grad.chunk(3)):
        p.grad = g.clone()
    opt_fused.step()
    opt_parts.step()
    assert torch.allclose(p_fused, torch.cat(p_parts), atol=1e-6)
    unsplit = fused.clone().requires_grad_()
    unsplit.grad = grad.clone()
    MuonAdamW([{"params": [unsplit], "muon": True}], lr=0.01).step()
    assert not torch.allclose(unsplit, p_fused, atol=1e-4)  # split changes the update


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a = [torch.randn(12, 6).requires_grad_(), torch.randn(6).requires_grad_()]
    opt = MuonAdamW([{"params": a[:1], "muon": True}, {"params": a[1:]}], lr=0.01, weight_decay=0.1)
    grads = _grads(3, [(12, 6), (6,)], 4)
    for step in grads[:2]:
        for p, g in zip(a, step):
            p.grad = g.clone()
        opt.step()
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = MuonAdamW([{"params": b[:1], "muon": True}, {"params": b[1:]}], lr=0.01, weight_decay=0.1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # through bytes, as a checkpoint would (state_dict() aliases tensors)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for step in grads[2:]:
        for pa, pb, g in zip(a, b, step):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_bad_groups_fail_clearly():
    with pytest.raises(ValueError, match="conv filters"):
        MuonAdamW([{"params": [torch.zeros(4, requires_grad=True)], "muon": True}])
    with pytest.raises(ValueError, match="split=3"):
        MuonAdamW([{"params": [torch.zeros(4, 4, requires_grad=True)], "muon": True, "split": 3}])


def test_batched_same_shape_matrices_equal_one_optimizer_each():
    torch.manual_seed(0)
    ws = [torch.randn(10, 6) for _ in range(3)] + [torch.randn(6, 10)]
    together = [w.clone().requires_grad_() for w in ws]
    alone = [w.clone().requires_grad_() for w in ws]
    opt = MuonAdamW([{"params": together, "muon": True}], lr=0.01, weight_decay=0.1)
    singles = [MuonAdamW([{"params": [p], "muon": True}], lr=0.01, weight_decay=0.1) for p in alone]
    for grads in _grads(4, [w.shape for w in ws], 3):
        for a, b, g in zip(together, alone, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        for single in singles:
            single.step()
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-6)


def test_conv_filter_takes_the_update_of_its_flattened_matrix():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    conv = w.clone().requires_grad_()
    flat = w.reshape(8, 36).clone().requires_grad_()
    opt_conv = MuonAdamW([{"params": [conv], "muon": True}], lr=0.02, weight_decay=0.1)
    opt_flat = MuonAdamW([{"params": [flat], "muon": True}], lr=0.02, weight_decay=0.1)
    for (grad,) in _grads(5, [(8, 4, 3, 3)], 3):
        conv.grad, flat.grad = grad.clone(), grad.reshape(8, 36).clone()
        opt_conv.step()
        opt_flat.step()
    assert conv.shape == (8, 4, 3, 3)
    assert torch.allclose(conv.reshape(8, 36), flat, atol=1e-6)
    assert (conv - w).abs().max() > 1e-2
