"""ToMe / PiToMe maths and model patching (timm, open_clip, HF CLIP)."""

from __future__ import annotations

import pytest
import torch

from compression import pitome, tome
from compression.merge import (
    attention,
    attention_ref,
    energy_score,
    energy_score_ref,
    merge_wavg,
    merge_wavg_ref,
    pitome_match,
    pitome_match_ref,
    tome_match,
    tome_match_ref,
)
from compression.patching import find_blocks, merge_state, run_unmerged_reference


def _pairs(m):
    return [set(zip(m.src[b].tolist(), m.dst[b].tolist())) for b in range(m.src.shape[0])]


def test_energy_matches_brute_force():
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 5)
    for margin in (0.0, 0.3, 0.75):
        fast, _ = energy_score(metric, margin)
        ref = energy_score_ref(metric, margin)
        assert torch.allclose(fast.double(), ref, atol=1e-6), (fast.double() - ref).abs().max()


def test_energy_hand_case():
    # two identical tokens and one orthogonal: S = [[1,1,0],[1,1,0],[0,0,1]], margin 0.5
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    e, _ = energy_score(metric, 0.5)
    low = torch.expm1(torch.tensor(-0.5)).item()
    expect = torch.tensor([[(0.5 + 0.5 + low) / 3, (0.5 + 0.5 + low) / 3, (low + low + 0.5) / 3]])
    assert torch.allclose(e, expect, atol=1e-6)


@pytest.mark.parametrize("bsm", [False, True])
def test_pitome_match_equals_reference(bsm):
    torch.manual_seed(1)
    metric = torch.randn(3, 1 + 12, 4)
    m = pitome_match(metric, r=4, margin=0.4, bsm=bsm)
    assert _pairs(m) == pitome_match_ref(metric, r=4, margin=0.4, bsm=bsm)
    assert (m.src != 0).all() and (m.dst != 0).all()  # CLS never merged
    assert m.num_out == 13 - 4


def test_pitome_protects_isolated_token():
    # 6 near-identical tokens + 1 odd token: the odd one has the lowest energy and is protected.
    base = torch.tensor([1.0, 0.0, 0.0])
    toks = [base + 0.01 * torch.randn(3) for _ in range(6)] + [torch.tensor([0.0, 0.0, 1.0])]
    metric = torch.stack([torch.tensor([0.0, 1.0, 0.0])] + toks)[None]
    m = pitome_match(metric, r=3, margin=0.5)
    assert 7 not in m.src.tolist()[0] and 7 not in m.dst.tolist()[0]


def test_tome_match_equals_reference():
    torch.manual_seed(2)
    metric = torch.randn(2, 1 + 10, 6)
    m = tome_match(metric, r=3)
    ref, r = tome_match_ref(metric, r=3)
    assert r == 3 and _pairs(m) == ref
    assert (m.src % 2 == 0).all() and (m.dst % 2 == 1).all() and (m.src != 0).all()


def test_merge_conserves_size_and_cls():
    torch.manual_seed(3)
    x = torch.randn(2, 11, 8)
    size = torch.randint(1, 4, (2, 11, 1)).float()
    m = pitome_match(torch.randn(2, 11, 4), r=4, margin=0.2)
    y, s = merge_wavg(m, x, size)
    y_ref, s_ref = merge_wavg_ref(m, x, size)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.equal(s, s_ref)
    assert torch.equal(s.sum(1), size.sum(1))  # total size conserved
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(s[:, 0], size[:, 0])  # CLS untouched
    assert torch.allclose((y * s).sum(1), (x * size).sum(1), atol=1e-4)  # mass conserved


def test_prop_attention_sizes_one_is_plain_attention():
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 2, 7, 4).unbind(0)
    ones = torch.ones(2, 7, 1)
    plain = attention(q, k, v)
    assert torch.allclose(attention(q, k, v, ones), plain, atol=1e-6)
    assert torch.allclose(attention(q, k, v, ones, fused=False), plain, atol=1e-6)
    size = torch.rand(2, 7, 1) * 3 + 1
    assert torch.allclose(attention(q, k, v, size), attention_ref(q, k, v, size), atol=1e-5)
    # size-s token == s identical copies of it (ToMe's motivation for proportional attention)
    k2 = torch.cat([k, k[:, :, :1].expand(-1, -1, 2, -1)], 2)
    v2 = torch.cat([v, v[:, :, :1].expand(-1, -1, 2, -1)], 2)
    s = torch.ones(2, 7, 1)
    s[:, 0] = 3
    assert torch.allclose(attention(q, k, v, s), attention_ref(q, k2, v2), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# models


def _timm_vit(global_pool="token"):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, num_classes=5, embed_dim=32, depth=4, num_heads=2,
                             global_pool=global_pool).eval()


def _open_clip_tower():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, width=32, layers=4, heads=2, mlp_ratio=2.0,
                             output_dim=16).eval()


def _hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           image_size=32, patch_size=4)
    return CLIPVisionModel(cfg).eval()


def _out(model, x):
    out = model(x)
    return out.pooler_output if hasattr(out, "pooler_output") else out


BUILDERS = {"timm": _timm_vit, "open_clip": _open_clip_tower, "hf_clip": _hf_clip}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_patch_identity_unpatch_and_merging(family):
    model = BUILDERS[family]()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = _out(model, x)
        assert find_blocks(model)[0] == family
        pitome.patch(model, ratio=1.0)  # no merging: exactly the original
        assert torch.equal(_out(model, x), ref)
        tome.patch(model, r=0)
        assert torch.equal(_out(model, x), ref)
        pitome.patch(model, ratio=0.8, margin=0.5)
        merged = _out(model, x)
        assert merged.shape == ref.shape and torch.isfinite(merged).all()
        tokens = merge_state(model).tokens
        assert tokens[0] == 65 and all(a > b for a, b in zip(tokens, tokens[1:]))
        tome.patch(model, r=6)
        _out(model, x)
        assert merge_state(model).tokens == [65, 59, 53, 47]
        tome.unpatch(model)
        assert merge_state(model) is None
        assert torch.equal(_out(model, x), ref)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_reimplemented_block_matches_original(family):
    model = BUILDERS[family]()
    _, blocks, _, _ = find_blocks(model)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ref = blocks[0](x, None) if family == "hf_clip" else blocks[0](x)
        assert torch.allclose(run_unmerged_reference(family, blocks[0], x), ref, atol=1e-5)
        assert torch.allclose(run_unmerged_reference(family, blocks[0], x, torch.ones(2, 17, 1)), ref, atol=1e-5)


def test_timm_unfused_flag_and_avg_pool():
    model = _timm_vit("avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pitome.patch(model, ratio=0.9)
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(model(x), fused, atol=1e-5)
        pitome.unpatch(model)
        assert "pool" not in model.__dict__


def test_llava_tower_is_found():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=4),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=32),
        image_token_index=31, image_seq_length=16)
    family, blocks, _, _ = find_blocks(LlavaForConditionalGeneration(cfg))
    assert family == "hf_clip" and len(blocks) == 2


def test_schedules():
    assert tome.parse_r(4, 3) == [4, 4, 4]
    assert tome.parse_r((4, 0.5), 3) == [2, 4, 6]
    spec = pitome.make_spec(4, ratio=0.9)
    assert spec.margin == [0.75, 0.5625, 0.375, 0.1875] and spec.bsm == [True, True, False, False]
    assert spec.num_removed(0, 65, True) == 6
    with pytest.raises(ValueError, match="ratios"):
        pitome.make_spec(4, ratio=0.4)
