"""Tests for ar_gen/gpt.py and ar_gen/sampling.py (tiny random models, CPU)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from ar_gen.gpt import GPT, GPTConfig, gpt_config, load_gpt, load_llamagen_checkpoint, save_gpt
from ar_gen.sampling import (
    SamplingConfig,
    apply_cfg,
    cfg_scale_at,
    generate,
    sample_from_logits,
    top_k_top_p_filter,
)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = gpt_config("GPT-test", vocab_size=kw.pop("vocab_size", 40), block_size=kw.pop("block_size", 16),
                     num_classes=kw.pop("num_classes", 5), **kw)
    model = GPT(cfg).eval()
    heads = model.output if isinstance(model.output, torch.nn.ModuleList) else [model.output]
    for head in heads:  # zero-init head gives uniform logits: re-draw so tests see real distributions
        torch.nn.init.normal_(head.weight, std=0.5)
    return model


def test_presets_llamagen_shapes_names_and_params():
    assert gpt_config("GPT-B", vocab_size=16384, block_size=256).num_params() == 110_888_448  # fact sheet
    hidden = {"GPT-B": 2048, "GPT-L": 2816, "GPT-XL": 3584, "GPT-XXL": 4096, "GPT-3B": 8704}
    for name, h in hidden.items():
        assert gpt_config(name).ffn_hidden == h
    for kw in [{}, {"token_each": 2}, {"model_type": "t2i", "cls_token_num": 3, "caption_dim": 8}, {"n_kv_head": 1}]:
        model = tiny(**kw)
        assert model.num_params() == model.config.num_params(), kw
    model = GPT(gpt_config("GPT-test", n_layer=12, vocab_size=64, block_size=16, num_classes=1000))
    keys = set(model.state_dict())
    for k in ["cls_embedding.embedding_table.weight", "tok_embeddings.weight", "layers.0.attention.wqkv.weight",
              "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
              "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
              "norm.weight", "output.weight"]:
        assert k in keys
    assert model.cls_embedding.embedding_table.weight.shape == (1001, 32)
    assert len(keys) == 4 + 7 * 12 and not any("freqs" in k or "cache" in k for k in keys)
    model.setup_caches(2, 17)
    assert set(model.state_dict()) == keys  # caches never enter the state dict
    with pytest.raises(ValueError, match="unknown GPT preset"):
        gpt_config("GPT-Z")
    with pytest.raises(ValueError, match="divisible by 4"):
        GPTConfig(dim=24, n_head=4)


def test_output_layer_zero_initialised_and_init_std():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-tiny", vocab_size=64, block_size=16, num_classes=3))
    assert model.output.weight.abs().max() == 0
    std = model.layers[0].attention.wqkv.weight.std().item()
    assert abs(std - 0.02) < 0.002


@pytest.mark.parametrize("token_each,n_kv_head,rope_prefix",
                         [(1, None, "zero"), (2, None, "zero"), (1, 1, "zero"), (2, 1, "zero"), (1, None, "identity"),
                          (2, 1, "identity")])
def test_cached_decoding_equals_full_forward_at_every_position(token_each, n_kv_head, rope_prefix):
    model = tiny(token_each=token_each, n_kv_head=n_kv_head, rope_prefix=rope_prefix)
    b, n = 3, model.config.block_size
    shape = (b, n) if token_each == 1 else (b, n, token_each)
    tokens = torch.randint(0, 40, shape)
    labels = torch.tensor([0, 4, 5])  # 5 = null class
    full = model(tokens[:, :-1], labels).logits  # (B, N, [te,] V)
    model.setup_caches(b, 1 + n)
    steps = [model(None, labels, input_pos=torch.arange(1)).logits]  # prefill, whole-cache mask
    for i in range(n - 1):
        kv_len = None if i % 2 else i + 2  # both the LlamaGen full-length mask and the kv_len window
        steps.append(model(tokens[:, i:i + 1], None, input_pos=torch.tensor([i + 1]), kv_len=kv_len).logits)
    cached = torch.cat(steps, 1)
    assert (cached - full).abs().max() < 1e-4, (cached - full).abs().max()
    # several new tokens at once over the cache (speculative verification), with rollback by overwrite
    model.setup_caches(b, 1 + n)
    model(None, labels, input_pos=torch.arange(1))
    junk = torch.randint(0, 40, (b, 5) + shape[2:])
    model(junk, None, input_pos=torch.arange(1, 6))  # rejected drafts at slots 1..5
    out = model(tokens[:, :4], None, input_pos=torch.arange(1, 5), return_hidden=True, kv_len=5)
    assert (out.logits - full[:, 1:5]).abs().max() < 1e-4
    assert out.hidden.shape == (b, 4, model.config.dim)


@pytest.mark.parametrize("rope_prefix", ["zero", "identity"])
def test_class_token_key_is_zero_only_with_llamagen_prefix_rows(rope_prefix):
    """LlamaGen's zero prefix rows make the class token's rotated key 0 for every label (every query scores it
    at 0, so attention cannot single it out); the identity rows keep a label-dependent, learnable key."""
    from vision.layers import apply_rotary_emb

    model = tiny(rope_prefix=rope_prefix)
    captured = {}
    model.layers[0].attention.wqkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    labels = torch.tensor([0, 1, 2])
    model(torch.randint(0, 40, (3, 4)), labels)
    att = model.layers[0].attention
    h, d = att.n_head, att.head_dim
    qkv = captured["qkv"]  # (B, 1 + 4, (H + 2 Hkv) D)
    k = qkv[..., h * d: h * d + att.n_kv_head * d].reshape(3, 5, att.n_kv_head, d)
    k_rot = apply_rotary_emb(k, model.freqs_cis[:5])
    class_keys = k_rot[:, 0]  # (B, Hkv, D)
    if rope_prefix == "zero":
        assert class_keys.abs().max() == 0
    else:
        torch.testing.assert_close(class_keys, k[:, 0])  # unrotated
        assert (class_keys[0] - class_keys[1]).abs().max() > 1e-3  # depends on the label
    assert k_rot[:, 1:].abs().amax(-1).min() > 0  # every image key is non-zero


def test_caption_conditioned_prefix_and_null_caption():
    torch.manual_seed(0)
    cfg = gpt_config("GPT-test", model_type="t2i", caption_dim=12, cls_token_num=4, vocab_size=30, block_size=9)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    caps = torch.randn(2, 4, 12)
    tokens = torch.randint(0, 30, (2, 9))
    full = model(tokens[:, :-1], caps).logits
    assert full.shape == (2, 9, 30)
    null = model.null_cond(2)
    assert torch.equal(null[0], model.cls_embedding.uncond_embedding)
    forced = model(tokens[:, :-1], caps, force_drop_ids=torch.ones(2)).logits
    torch.testing.assert_close(forced, model(tokens[:, :-1], null).logits)
    g = torch.Generator().manual_seed(1)
    out = generate(model, caps, SamplingConfig(cfg_scale=3.0, top_k=5), generator=g)
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="caption features"):
        model(tokens, torch.randn(2, 3, 12))


def test_label_dropout_uses_null_class():
    model = tiny()
    model.train()
    model.config.class_dropout_prob = 1.0
    model.cls_embedding.dropout_prob = 1.0
    emb = model.embed_cond(torch.tensor([0, 1, 2]))
    null_row = model.cls_embedding.embedding_table.weight[5]
    assert torch.equal(emb, null_row.expand(3, 1, -1))
    model.cls_embedding.dropout_prob = 0.5
    torch.manual_seed(0)
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = model.cls_embedding.drop(labels)
    assert set(dropped.unique().tolist()) == {0, 5}
    frac = (dropped == 5).float().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / 4000)
    model.eval()
    assert torch.equal(model.embed_cond(torch.tensor([2])), model.cls_embedding.embedding_table.weight[2].view(1, 1, -1))


def test_cfg_scale_one_equals_cond_logits_and_formula():
    model = tiny()
    labels = torch.tensor([1, 2])
    tokens = torch.randint(0, 40, (2, 16))
    both = torch.cat([labels, model.null_cond(2)])
    logits = model(torch.cat([tokens, tokens])[:, :-1], both).logits
    cond = model(tokens[:, :-1], labels).logits
    torch.testing.assert_close(apply_cfg(logits, 1.0), cond, atol=1e-6, rtol=0)
    uncond = logits[2:]
    torch.testing.assert_close(apply_cfg(logits, 3.0), uncond + 3.0 * (cond - uncond))
    # greedy generation with LlamaGen's cfg-interval 0 (scale 2 for tokens 0-1, then 1 on the still doubled
    # batch) equals a hand-written loop over the full forward where scale-1 steps use the cond logits alone
    got = generate(model, labels, SamplingConfig(cfg_scale=2.0, cfg_schedule="interval", cfg_interval=0, greedy=True))
    seq = torch.zeros(2, 0, dtype=torch.long)
    for t in range(16):
        if t < 2:
            lg = apply_cfg(model(torch.cat([seq, seq]), both).logits[:, -1], 2.0)
        else:
            lg = model(seq, labels).logits[:, -1]
        seq = torch.cat([seq, lg.argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


def test_cfg_schedules():
    c = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")
    assert cfg_scale_at(0, 4, c) == pytest.approx(1.5) and cfg_scale_at(3, 4, c) == pytest.approx(3.0)
    c = SamplingConfig(cfg_scale=3.0, cfg_schedule="cos")
    assert cfg_scale_at(3, 4, c) == pytest.approx(3.0)
    assert cfg_scale_at(1, 4, c) == pytest.approx(1 + 2 * math.sin(math.pi * 0.5 / 2))
    c = SamplingConfig(cfg_scale=3.0, cfg_schedule="interval", cfg_interval=2)
    assert [cfg_scale_at(t, 8, c) for t in range(6)] == [3.0, 3.0, 3.0, 3.0, 1.0, 1.0]
    assert cfg_scale_at(7, 8, SamplingConfig(cfg_scale=3.0)) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingConfig(cfg_schedule="square")


def test_top_k_and_top_p_keep_exactly_the_right_support():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, -1.0]])
    kept = torch.isfinite(top_k_top_p_filter(logits, top_k=2))
    assert kept.tolist() == [[True, False, True, True, False, False]]  # tie at the 2nd value kept
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lg = probs.log()
    assert torch.isfinite(top_k_top_p_filter(lg, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_k_top_p_filter(lg, top_p=0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_k_top_p_filter(lg, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_k_top_p_filter(lg, top_p=0.1)).tolist() == [[True, False, False, False]]
    # order: top-k first, then top-p on the renormalised survivors
    both = torch.isfinite(top_k_top_p_filter(lg, top_k=3, top_p=0.6))
    assert both.tolist() == [[True, True, False, False]]  # 0.5/0.95 < 0.6 -> second token kept too
    # sampling never leaves the support; per-head top-k for sub-tokens (B, te, V)
    g = torch.Generator().manual_seed(0)
    sub = torch.randn(64, 2, 50)
    cfg = SamplingConfig(top_k=3)
    draws = sample_from_logits(sub, cfg, g)
    top3 = sub.topk(3, dim=-1).indices
    assert draws.shape == (64, 2) and (top3 == draws[..., None]).any(-1).all()


def test_seed_reproduces_tokens_exactly():
    model = tiny()
    labels = torch.tensor([0, 3])
    cfg = SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.95, temperature=1.1)
    a = generate(model, labels, cfg, generator=torch.Generator().manual_seed(7))
    b = generate(model, labels, cfg, generator=torch.Generator().manual_seed(7))
    c = generate(model, labels, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.min() >= 0 and a.max() < 40


def test_sampling_distribution_matches_model_probabilities():
    """Chi-square check: token 0 drawn by ``generate`` follows softmax(guided logits)."""
    model = tiny(vocab_size=6, block_size=4)
    labels = torch.zeros(3000, dtype=torch.long)
    toks = generate(model, labels, SamplingConfig(cfg_scale=1.5), num_tokens=1,
                    generator=torch.Generator().manual_seed(0))
    both = torch.tensor([0, 5])  # cond row, null row
    model.setup_caches(2, 2)
    logits = model(None, both, input_pos=torch.arange(1)).logits[:, -1]
    p = apply_cfg(logits, 1.5).softmax(-1)[0]
    counts = torch.bincount(toks[:, 0], minlength=6).float()
    expected = p * 3000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (chi2, counts, expected)  # 5 dof, p ~ 0.001


def test_sub_token_heads_match_bae_bit_packing():
    from tokenizers_img.quantizers import bits_to_subtokens, subtokens_to_bits

    te, cd = 2, 3
    model = tiny(token_each=te, vocab_size=2**cd, block_size=4)
    bits = torch.randint(0, 2, (5, 4, te * cd)).float()  # (B, N, K) as the BAE lays them out
    tokens = bits_to_subtokens(bits, te, cd)  # (B, N, te), MSB-first chunks
    out = model(tokens[:, :-1], torch.zeros(5, dtype=torch.long), targets=tokens)
    assert out.logits.shape == (5, 4, te, 2**cd)
    # head j predicts chunk j: a one-hot "perfect" logit on the packed ids gives zero loss, and the
    # sampled ids unpack to exactly the bits they encode
    perfect = torch.full((5, 4, te, 2**cd), -1e4).scatter(-1, tokens[..., None], 1e4)
    assert model.loss_from_logits(perfect, tokens).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, torch.tensor([1, 2]), SamplingConfig(cfg_scale=2.0, top_k=3), generator=g)
    assert sampled.shape == (2, 4, te)
    assert torch.equal(bits_to_subtokens(subtokens_to_bits(sampled, cd), te, cd), sampled)
    assert torch.equal(subtokens_to_bits(tokens, cd), bits)


def test_save_load_roundtrip_and_wrong_size_checkpoint_fails(tmp_path):
    model = tiny()
    save_gpt(model, tmp_path / "gpt", extra={"tokenizer_vocab": 40})
    loaded, meta = load_gpt(tmp_path / "gpt")
    assert meta["tokenizer_vocab"] == 40
    x, y = torch.randint(0, 40, (2, 15)), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, y).logits, model(x, y).logits)
    # LlamaGen-format file of another size: clear error naming the mismatching keys
    torch.save({"model": model.state_dict()}, tmp_path / "c2i.pt")
    with pytest.raises(ValueError, match=r"shape-mismatched keys \(\d+\): .*tok_embeddings.weight"):
        load_llamagen_checkpoint(tmp_path / "c2i.pt", "GPT-test", vocab_size=41, block_size=16, num_classes=5)
    with pytest.raises(ValueError, match="missing keys"):
        load_llamagen_checkpoint(tmp_path / "c2i.pt", "GPT-test", vocab_size=40, block_size=16, num_classes=5,
                                 n_layer=3)
    ok = load_llamagen_checkpoint(tmp_path / "c2i.pt", "GPT-test", vocab_size=40, block_size=16, num_classes=5)
    torch.testing.assert_close(ok(x, y).logits, model(x, y).logits)
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a workbench GPT"):
        load_gpt(tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        load_gpt(tmp_path / "nope.ckpt")


@pytest.mark.skipif(not os.environ.get("VTW_LLAMAGEN_PATH"), reason="set VTW_LLAMAGEN_PATH to a LlamaGen checkout")
def test_llamagen_state_dict_loads_with_identical_logits_and_greedy_tokens(tmp_path):
    """Parity with FoundationVision/LlamaGen's own code (not shipped; imported from VTW_LLAMAGEN_PATH)."""
    import sys

    sys.path.insert(0, os.environ["VTW_LLAMAGEN_PATH"])
    from autoregressive.models.generate import generate as lg_generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    torch.manual_seed(0)
    lg = Transformer(ModelArgs(dim=64, n_layer=3, n_head=4, vocab_size=50, block_size=16, num_classes=10)).eval()
    torch.nn.init.normal_(lg.output.weight, std=0.3)
    torch.save({"model": lg.state_dict()}, tmp_path / "c2i_tiny.pt")
    ours = load_llamagen_checkpoint(tmp_path / "c2i_tiny.pt", "GPT-test", dim=64, n_layer=3, n_head=4, vocab_size=50,
                                    block_size=16, num_classes=10, multiple_of=256)
    x, y = torch.randint(0, 50, (3, 15)), torch.tensor([1, 4, 10])
    lg.train()  # LlamaGen's only full-sequence path; switch every dropout off
    lg.cls_embedding.dropout_prob = 0.0
    for m in lg.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        assert torch.equal(lg(x, y)[0], ours(x, y).logits)
    lg.eval()
    with torch.no_grad():
        ref = lg_generate(lg, torch.tensor([1, 4]), 16, cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=1,
                          top_p=1.0, sample_logits=True)
    assert torch.equal(ref.long(), generate(ours, torch.tensor([1, 4]), SamplingConfig(cfg_scale=2.0, greedy=True)))


def test_draw_categorical_law_support_and_edges():
    """Inverse-CDF draws: chi-square against the (unnormalised) weights, zero weights never drawn,
    one-hot rows always give their index."""
    from ar_gen.sampling import draw_categorical

    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 3.0, 1.0, 0.0, 4.0, 2.0, 0.0])  # unnormalised, zeros at both ends too
    n = 20000
    draws = draw_categorical(weights.expand(n, -1), g)
    counts = torch.bincount(draws, minlength=7).float()
    assert counts[[0, 3, 6]].sum() == 0
    support = weights > 0
    expected = weights[support] / weights.sum() * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3, (chi2, counts)  # 3 dof, p ~ 0.001
    onehot = torch.eye(5)
    assert torch.equal(draw_categorical(onehot, g), torch.arange(5))
    last = torch.zeros(3, 16384)
    last[:, -1] = 1e-30  # all mass on the last entry, tiny in absolute terms
    assert torch.equal(draw_categorical(last, g), torch.full((3,), 16383))
    with pytest.raises(ValueError, match="sums to zero or is not finite"):
        draw_categorical(torch.tensor([[0.5, 0.5], [0.0, 0.0]]), g)
    with pytest.raises(ValueError, match="sums to zero or is not finite"):
        draw_categorical(torch.tensor([[0.5, float("nan")]]), g)


@pytest.mark.parametrize("backend", ["mkl", "onednn"])
def test_packed_linears_match_f_linear_and_restore(backend, monkeypatch):
    import vision.layers as layers
    from vision.layers import packed_linear_available, packed_linears

    if not packed_linear_available(backend):
        pytest.skip(f"this torch build has no {backend} packed linear ops (non-x86)")
    monkeypatch.setattr(layers, "_PACKED_LINEAR", backend)  # generate() below packs with the default backend
    torch.manual_seed(0)
    model = tiny(vocab_size=64, block_size=16).eval()
    x = torch.randn(6, 1, model.config.dim)
    lin = model.layers[0].attention.wqkv
    with torch.no_grad():
        ref = lin(x)
        with packed_linears(model, rows=6) as packed:
            assert lin in packed.patched and lin.forward.backend == backend
            assert torch.allclose(lin(x), ref, atol=1e-5)
            assert torch.allclose(lin(x[:3]), ref[:3], atol=1e-6)  # other row counts: F.linear
        assert "forward" not in lin.__dict__ and not packed.patched
    with packed_linears(model, rows=6):  # autograd on: the reference path, gradients flow
        x.requires_grad_(True)
        lin(x).sum().backward()
        assert x.grad is not None
    labels = torch.tensor([1, 2, 3])
    greedy = SamplingConfig(cfg_scale=2.0, greedy=True)
    fast = generate(model, labels, greedy, packed_weights=True)
    slow = generate(model, labels, greedy, packed_weights=False)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("backend", ["mkl", "onednn"])
def test_packed_linears_several_row_counts_and_modules(backend):
    from vision.layers import packed_linear_available, packed_linears

    if not packed_linear_available(backend):
        pytest.skip(f"this torch build has no {backend} packed linear ops (non-x86)")
    torch.manual_seed(0)
    model = tiny(vocab_size=64, block_size=16).eval()
    head, wqkv = model.output, model.layers[0].attention.wqkv
    x = torch.randn(8, model.config.dim)
    with torch.no_grad():
        ref_head, ref_qkv = head(x), wqkv(x)
        # the head is reached through both specs: it gets both row counts, the other linears only 8;
        # row counts below PACKED_MIN_ROWS (2 here) stay on F.linear
        with packed_linears.of([(model, 8), (head, (2, 5, 8))], backend=backend) as packed:
            assert head.forward.packed_rows == (5, 8) and wqkv.forward.packed_rows == (8,)
            assert len(packed.patched) == len({id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)})
            torch.testing.assert_close(head(x), ref_head, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head(x[:5]), ref_head[:5], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head(x[:2]), ref_head[:2], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(wqkv(x[:2]), ref_qkv[:2], atol=1e-6, rtol=1e-6)  # F.linear fallback
        assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="row counts must be >= 1"):
        packed_linears(model, rows=(0, 2))


def test_packed_linear_backend_choice(monkeypatch):
    import vision.layers as layers

    ops = {"mkl": True, "onednn": True}
    monkeypatch.setattr(layers, "_backend_ops_present", lambda b: ops[b])
    monkeypatch.setattr(layers, "_cpu_vendor", lambda: "GenuineIntel")
    assert layers.packed_linear_backend("auto") == "mkl"
    monkeypatch.setattr(layers, "_cpu_vendor", lambda: "AuthenticAMD")
    assert layers.packed_linear_backend("auto") == "onednn"
    ops["onednn"] = False  # auto falls back to what the build has; a forced backend it lacks means no packing
    assert layers.packed_linear_backend("auto") == "mkl"
    assert layers.packed_linear_backend("onednn") is None
    assert layers.packed_linear_backend("0") is None and layers.packed_linear_backend("MKL") == "mkl"
    with pytest.raises(ValueError, match="VTW_PACKED_LINEAR"):
        layers.packed_linear_backend("blas")
    # oneDNN also packs big layers below PACKED_MIN_ROWS; MKL never does
    assert not layers.packs_rows("mkl", 1024 * 1024, 1) and layers.packs_rows("onednn", 1024 * 1024, 1)
    assert not layers.packs_rows("onednn", 192 * 576, 2) and layers.packs_rows("onednn", 192 * 576, 4)
    assert not layers.packs_rows(None, 1024 * 1024, 16)


def test_packed_linears_fall_back_when_packing_fails(monkeypatch):
    import vision.layers as layers
    from vision.layers import packed_linears

    monkeypatch.setattr(layers, "_backend_ops_present", lambda b: True)  # _pack is replaced: no real op runs
    model = tiny(vocab_size=64, block_size=16).eval()
    x = torch.randn(8, model.config.dim)
    with torch.no_grad():
        ref = model.output(x)

        def broken(self, weight, rows):
            raise RuntimeError("unsupported on this CPU")

        monkeypatch.setattr(packed_linears, "_pack", broken)
        with pytest.warns(UserWarning, match="packing failed"):
            with packed_linears(model, rows=8, backend="onednn") as packed:
                assert not packed.patched and not any("forward" in m.__dict__ for m in model.modules())
                torch.testing.assert_close(model.output(x), ref)
