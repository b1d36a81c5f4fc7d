"""Mamba scan paths (reference vs chunked vs mamba-ssm), the block, the interleaved-slice permutation."""

from __future__ import annotations

import pytest
import torch

from vision.mamba import (
    HAS_MAMBA_SSM,
    Mamba,
    MambaConfig,
    MambaLayer,
    inverse_permutation,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    slice_permutation,
)


def _inputs(batch=2, dim=6, n=4, length=45, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    u, delta, z = r(batch, dim, length), 0.5 * r(batch, dim, length), r(batch, dim, length)
    A = -(torch.rand(dim, n, generator=g) + 0.2).to(device)
    B, C = r(batch, n, length), r(batch, n, length)
    D, bias = r(dim).float(), r(dim).float()
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


@pytest.mark.parametrize("chunk,blocked", [(1, False), (7, False), (16, False), (64, False), (None, True)])
def test_chunked_matches_reference_outputs_and_grads(chunk, blocked):
    args = _inputs()
    u, delta, A, B, C, D, z, bias = args

    def run(fn, **kw):
        out = fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, **kw)
        grads = torch.autograd.grad((out * out.cos()).sum(), args)
        return out, grads

    ref_out, ref_grads = run(selective_scan_ref)
    out, grads = run(selective_scan_chunked, chunk=chunk, blocked=blocked)
    err = (out - ref_out).abs().max().item()
    assert err < 1e-5, f"max abs output diff {err}"
    for name, g, rg in zip("u delta A B C D z bias".split(), grads, ref_grads):
        gerr = ((g - rg).abs().max() / (rg.abs().max() + 1e-6)).item()
        assert gerr < 1e-5, f"grad {name}: max rel diff {gerr}"


def test_last_state_of_reference_and_no_skip_no_gate():
    u, delta, A, B, C, *_ = [t.detach() for t in _inputs(length=20)]
    out_ref, h = selective_scan_ref(u, delta.abs(), A, B, C, return_last_state=True)
    out = selective_scan_chunked(u, delta.abs(), A, B, C, chunk=8)
    assert torch.allclose(out, out_ref, atol=1e-5) and h.shape == (2, 6, 4)


def test_hand_made_scan():
    # one channel, one state, A=-1, delta=log(2) -> decay 1/2, B=C=1: y_t = sum_s 2^-(t-s) * log(2) * u_s
    u = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])
    delta = torch.full_like(u, torch.log(torch.tensor(2.0)).item())
    A = torch.tensor([[-1.0]])
    B = C = torch.ones(1, 1, 4)
    expected = torch.log(torch.tensor(2.0)) * torch.tensor([1.0, 0.5, 0.25, 2.125])
    for fn in (selective_scan_ref, selective_scan_chunked):
        assert torch.allclose(fn(u, delta, A, B, C)[0, 0], expected, atol=1e-6)
    for blocked in (True, False):
        out = selective_scan_chunked(u, delta, A, B, C, chunk=3, blocked=blocked)
        assert torch.allclose(out[0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("directions", [("fwd",), ("fwd", "bwd", "slice")])
def test_block_fast_vs_reference_flag(directions):
    torch.manual_seed(0)
    m = Mamba(MambaConfig(d_model=16, d_state=4, directions=directions, nslices=5, chunk=8))
    x = torch.randn(2, 40, 16, requires_grad=True)
    outs, grads = [], []
    for mode in ("ref", "chunked"):
        m.cfg.scan_mode = mode
        y = m(x)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
        outs.append(y)
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for g0, g1 in zip(*grads):
        assert (g0 - g1).abs().max() / (g0.abs().max() + 1e-6) < 1e-4


def test_block_parameter_names_follow_tokenunify():
    m = Mamba(MambaConfig(d_model=8, directions=("fwd", "bwd", "slice")))
    names = set(dict(m.named_parameters()))
    for key in ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "A_log", "D",
                "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b",
                "conv1d_s.weight", "x_proj_s.weight", "dt_proj_s.bias", "A_s_log", "D_s", "out_proj.weight"]:
        assert key in names, key


def test_block_is_causal_forward_only():
    torch.manual_seed(0)
    m = Mamba(MambaConfig(d_model=8, d_state=4, chunk=4))
    x = torch.randn(1, 20, 8)
    x2 = x.clone()
    x2[:, 12:] += 1.0
    y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :12], y2[:, :12], atol=1e-6) and not torch.allclose(y[:, 12:], y2[:, 12:])


def test_slice_permutation_matches_tokenunify_and_inverts():
    perm = slice_permutation(10, 5)
    # chunks [0,1] [2,3] [4,5] [6,7] [8,9] interleaved: position i*5+k <- k*2+i
    assert perm.tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    for length, n in [(100, 5), (37, 5), (7, 3), (5, 5)]:
        p = slice_permutation(length, n)
        assert sorted(p.tolist()) == list(range(length))
        x = torch.randn(3, length)
        assert torch.equal(x[:, p][:, inverse_permutation(p)], x)


def test_mamba_layer_shape():
    layer = MambaLayer(8, d_state=4, directions=("fwd", "bwd", "slice"))
    x = torch.randn(1, 8, 2, 3, 5)
    assert layer(x).shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_paths_agree():
    args = [t.detach().cuda().requires_grad_() for t in _inputs(dim=16, length=300)]
    u, delta, A, B, C, D, z, bias = args
    ref = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    for mode in ["chunked"] + (["cuda"] if HAS_MAMBA_SSM else []):
        out = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, mode=mode)
        assert (out - ref).abs().max() < 1e-4, mode
