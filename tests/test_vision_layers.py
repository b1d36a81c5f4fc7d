"""Tests for vision/layers.py: fused vs reference attention, KV cache, RoPE, RMSNorm, SwiGLU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vision.layers import (
    Attention,
    FeedForward,
    KVCache,
    RMSNorm,
    TransformerBlock,
    apply_rotary_emb,
    apply_rotary_emb_ref,
    attention,
    attention_eager_lowp,
    attention_ref,
    find_multiple,
    precompute_freqs_cis,
    precompute_freqs_cis_2d,
)


def test_rmsnorm_matches_hand_computation():
    torch.manual_seed(0)
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-5)
    expected = torch.tensor([[1 / rms, 2 * 2 / rms, 0.5 * 3 / rms, -4 / rms]])
    torch.testing.assert_close(norm(x), expected)
    # bf16 module and input: normalised in fp32, cast back, result stays bf16
    out16 = norm.bfloat16()(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), expected, atol=2e-2, rtol=2e-2)


def test_swiglu_matches_formula_and_llamagen_sizes():
    torch.manual_seed(0)
    ff = FeedForward(16, hidden_dim=24)
    x = torch.randn(2, 3, 16)
    expected = F.linear(F.silu(F.linear(x, ff.w1.weight)) * F.linear(x, ff.w3.weight), ff.w2.weight)
    torch.testing.assert_close(ff(x), expected)
    # LlamaGen hidden sizes (fact sheet: B 2048, L 2816, XL 3584, XXL 4096, 3B 8704)
    for dim, hidden in [(768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (3200, 8704)]:
        assert find_multiple(int(2 * 4 * dim / 3), 256) == hidden
    assert FeedForward(768, device="meta").w1.weight.shape == (2048, 768)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_equals_reference(n_kv_head, causal):
    torch.manual_seed(0)
    attn = Attention(32, n_head=4, n_kv_head=n_kv_head)
    x = torch.randn(2, 7, 32, requires_grad=True)
    freqs = precompute_freqs_cis(7, 8)
    attn.fused_attn = True
    y_fused = attn(x, freqs, is_causal=causal)
    (g_fused,) = torch.autograd.grad(y_fused.square().sum(), x)
    attn.fused_attn = False
    y_ref = attn(x, freqs, is_causal=causal)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert (y_fused - y_ref).abs().max() < 1e-5, f"max abs diff {(y_fused - y_ref).abs().max()}"
    torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv_head,causal,use_mask", [(4, True, False), (2, False, True), (1, True, True)])
def test_eager_lowp_attention_matches_reference_in_bf16_with_gradients(n_kv_head, causal, use_mask):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, n_kv_head, 9, 16), torch.randn(2, n_kv_head, 9, 16)
    mask = None
    if use_mask:
        mask = torch.rand(2, 1, 9, 9) > 0.3
        mask[..., 0] = True  # no empty rows
    grads = {}
    outs = {}
    for name, fn, dtype in [("ref", attention_ref, torch.float32), ("eager", attention_eager_lowp, torch.bfloat16)]:
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask=mask, is_causal=causal)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        outs[name], grads[name] = out.float(), [t.grad.float() for t in leaves]
    torch.testing.assert_close(outs["eager"], outs["ref"], atol=3e-2, rtol=3e-2)
    for g_eager, g_ref in zip(grads["eager"], grads["ref"]):
        torch.testing.assert_close(g_eager, g_ref, atol=0.1, rtol=5e-2)


def test_attention_dispatch_cpu_bf16_training_uses_eager_path_else_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, is_causal=True)  # autograd on, bf16, CPU: eager matmuls
    assert torch.equal(out, attention_eager_lowp(q, k, v, is_causal=True))
    with torch.no_grad():  # inference: SDPA
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.equal(attention(q, k, v, is_causal=True), sdpa)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))  # fp32 training: SDPA
    long = [torch.randn(1, 2, 200, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]  # > 128 keys
    assert torch.equal(attention(*long, is_causal=True), F.scaled_dot_product_attention(*long, is_causal=True))
    assert torch.equal(attention(q32, k32, v32, is_causal=True),
                       F.scaled_dot_product_attention(q32, k32, v32, is_causal=True))


def test_attention_bool_mask_equals_reference_and_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.rand(2, 1, 3, 5) > 0.4
    mask[..., 0] = True  # no empty rows
    out = attention(q, k, v, mask=mask)
    ref = attention_ref(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # changing a masked-out value must not change the output
    v2 = v.clone()
    v2[:, :, 1] += 100.0
    only = mask.clone()
    only[..., 1] = False
    torch.testing.assert_close(attention(q, k, v, mask=only), attention(q, k, v2, mask=only))


def test_kv_cache_update_writes_slots_and_rollback_overwrites():
    cache = KVCache(max_batch=3, max_seq=6, n_kv_head=2, head_dim=4)
    k = torch.ones(2, 2, 2, 4)
    k_out, v_out = cache.update(torch.tensor([1, 2]), k, 2 * k)
    assert k_out.shape == (2, 2, 6, 4)
    assert cache.k_cache[:2, :, 1:3].eq(1).all() and cache.k_cache[:, :, [0, 3, 4, 5]].eq(0).all()
    assert cache.k_cache[2].eq(0).all() and cache.v_cache[:2, :, 1:3].eq(2).all()
    cache.update(torch.tensor([2]), 5 * torch.ones(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))  # roll back slot 2
    assert cache.k_cache[:2, :, 2].eq(5).all() and cache.k_cache[:2, :, 1].eq(1).all()
    assert "k_cache" not in cache.state_dict()
    # scattered slots (a tree of drafts) take index_copy_, a run of slots a strided copy: same buffers
    scattered, run = KVCache(2, 6, 2, 4), KVCache(2, 6, 2, 4)
    kv = torch.randn(2, 2, 3, 4)
    scattered.update(torch.tensor([4, 0, 2]), kv, -kv)
    for j, slot in enumerate([4, 0, 2]):
        run.update(torch.tensor([slot]), kv[:, :, j:j + 1], -kv[:, :, j:j + 1])
    assert torch.equal(scattered.k_cache, run.k_cache) and torch.equal(scattered.v_cache, run.v_cache)
    assert scattered.k_cache[:, :, [1, 3, 5]].eq(0).all()
    with pytest.raises(IndexError):  # a negative slot is an error, never a write from the end
        run.update(torch.tensor([-1]), kv[:, :, :1], kv[:, :, :1])
    with pytest.raises(ValueError, match="max_batch"):
        cache.update(torch.tensor([0]), torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_decoding_equals_full_forward(n_kv_head):
    torch.manual_seed(0)
    block = TransformerBlock(32, n_head=4, n_kv_head=n_kv_head, multiple_of=16).eval()
    b, t, s = 2, 9, 12
    x = torch.randn(b, t, 32)
    freqs = precompute_freqs_cis_2d(3, 8, cls_token_num=0)  # 9 positions
    full = block(x, freqs, is_causal=True)
    block.attention.kv_cache = KVCache(b, s, n_kv_head, 8)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    # prefill 4 tokens (full-length mask), then 1 token, then 2 tokens at once, then 2 with kv_len
    outs, pos = [], 0
    for n, use_kv_len in [(4, False), (1, False), (2, False), (1, True), (1, True)]:
        ip = torch.arange(pos, pos + n)
        if use_kv_len:
            kv_len = pos + n
            mask = None if n == 1 else causal[ip][:, :kv_len]
            outs.append(block(x[:, pos:pos + n], freqs[ip], ip, mask=mask, kv_len=kv_len))
        else:
            outs.append(block(x[:, pos:pos + n], freqs[ip], ip, mask=causal[None, None, ip]))
        pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_fast_path_equals_reference(per_row, dtype):
    torch.manual_seed(0)
    b, t, h, d = 3, 5, 4, 16
    fused = torch.randn(b, t, 3 * h * d, dtype=dtype, requires_grad=True)  # like Attention's wqkv output
    q, k, _ = fused.split([h * d, h * d, h * d], dim=-1)
    q, k = q.view(b, t, h, d), k.view(b, t, h, d)  # non-contiguous views, k at an odd-looking offset
    freqs = precompute_freqs_cis_2d(4, d, cls_token_num=1)
    f = freqs[torch.randint(0, freqs.shape[0], (b, t))] if per_row else freqs[:t]  # (B, T, D/2, 2) | (T, D/2, 2)
    odd = fused[..., 1:1 + h * d].view(b, t, h, d)  # odd storage offset: the fast path copies first
    for x in (q, k, odd):
        fast, ref = apply_rotary_emb(x, f), apply_rotary_emb_ref(x, f)
        assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape
        torch.testing.assert_close(fast, ref, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    (gf,) = torch.autograd.grad(apply_rotary_emb(q, f).float().square().sum(), fused)
    (gr,) = torch.autograd.grad(apply_rotary_emb_ref(q, f).float().square().sum(), fused)
    torch.testing.assert_close(gf, gr, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-4)


def test_rope_relative_position_property_1d():
    torch.manual_seed(0)
    d = 16
    freqs = precompute_freqs_cis(40, d)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(m, n):
        qm = apply_rotary_emb(q, freqs[m:m + 1])
        kn = apply_rotary_emb(k, freqs[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(30, 27), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)  # position 0: identity
    assert not torch.allclose(score(5, 2), score(5, 3))
    # rotation preserves the norm
    torch.testing.assert_close(apply_rotary_emb(q, freqs[7:8]).norm(), q.norm())


def test_rope_2d_layout_relative_property_and_llamagen_prefix_quirk():
    torch.manual_seed(0)
    d, g, cls = 16, 5, 2
    freqs = precompute_freqs_cis_2d(g, d, cls_token_num=cls)
    assert freqs.shape == (cls + g * g, d // 2, 2)
    assert freqs[:cls].eq(0).all()  # LlamaGen quirk: zero rows, so prefix q/k vanish
    q = torch.randn(1, cls + 1, 2, d)
    assert apply_rotary_emb(q, freqs[: cls + 1])[:, :cls].abs().max() == 0
    ident = precompute_freqs_cis_2d(g, d, cls_token_num=cls, prefix="identity")
    torch.testing.assert_close(apply_rotary_emb(q, ident[: cls + 1])[:, :cls], q[:, :cls])
    # pairs 0..D/4-1 follow the row, D/4..D/2-1 the column: token (r, c) = cls + r*g + c
    grid = freqs[cls:].view(g, g, d // 2, 2)
    assert torch.allclose(grid[2, 0, : d // 4], grid[2, 4, : d // 4])  # row pairs ignore the column
    assert torch.allclose(grid[0, 3, d // 4:], grid[4, 3, d // 4:])  # column pairs ignore the row
    q1, k1 = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(a, b):
        return (apply_rotary_emb(q1, freqs[cls + a[0] * g + a[1]][None]) *
                apply_rotary_emb(k1, freqs[cls + b[0] * g + b[1]][None])).sum()

    torch.testing.assert_close(score((3, 4), (1, 2)), score((2, 2), (0, 0)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score((3, 4), (1, 2)), score((3, 4), (2, 1)))
    with pytest.raises(ValueError, match="divisible by 4"):
        precompute_freqs_cis_2d(4, 6)
    rect = precompute_freqs_cis_2d((2, 3), 8)
    assert rect.shape == (6, 4, 2)
