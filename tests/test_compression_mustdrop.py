"""MustDrop / FastV on a tiny random HF LLaVA through compression.llava_runner."""

from __future__ import annotations

import pytest
import torch

from compression import fastv, mustdrop
from compression import llava_runner as R
from compression.llava_runner import PREFIX, TEXT, VISION
from compression.tiny_llava import (
    ShapesVQA,
    WordTokenizer,
    build_tiny_llava,
    build_vocab,
    load_llava,
    save_tiny_llava,
    tiny_llava_config,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_llava_config("nano")  # 24 px, patch 4 -> 6x6 grid; 2 vision layers; 4 LM layers
    tok = WordTokenizer(build_vocab())
    model = build_tiny_llava(cfg, len(tok.vocab), tok.image_id).eval()
    ds = ShapesVQA("val", 3, cfg.image_size, 36, max_count=3)
    items = [ds[i] for i in range(3)]
    px = torch.stack([it["pixel_values"] for it in items])
    prompts = [it["input_ids"][: it["prompt_len"]] for it in items]
    return model, tok, cfg, px, prompts


def _plan(**kw):
    base = dict(merge_threshold=0.3, global_thr=0.5, individual_thr=0.5, prune_layers=(1, 2))
    return mustdrop.make_plan(mustdrop.MustDropConfig(**{**base, **kw}), 4)


def test_runner_matches_hf_forward(setup):
    model, _, _, px, prompts = setup
    out = R.prefill(model, px, prompts)
    with torch.no_grad():
        hf = torch.cat([model(input_ids=p[None], pixel_values=px[i:i + 1]).logits[:, -1] for i, p in enumerate(prompts)])
    assert torch.allclose(out.logits, hf, atol=1e-5), (out.logits - hf).abs().max()


def test_all_stages_off_is_exactly_undropped(setup):
    model, _, _, px, prompts = setup
    ref_tokens, ref = R.generate(model, px, prompts, None, max_new_tokens=3)
    off = _plan(stage1=False, stage2=False, stage3=False)
    tokens, out = R.generate(model, px, prompts, off, max_new_tokens=3)
    assert torch.equal(out.logits, ref.logits) and torch.equal(tokens, ref_tokens)
    keep_all = R.DropPlan(drop_layers=(1, 2), rule=lambda li, probs, ctx: ctx["valid"])  # gathers, drops nothing
    assert torch.allclose(R.prefill(model, px, prompts, keep_all).logits, ref.logits, atol=1e-6)


def test_batch_equals_single_runs(setup):
    model, _, _, px, prompts = setup
    plan = _plan()
    tokens, out = R.generate(model, px, prompts, plan, max_new_tokens=3)
    assert (out.vision_out < out.vision_in).any()  # something was dropped
    for i in range(len(prompts)):
        t1, o1 = R.generate(model, px[i:i + 1], prompts[i:i + 1], plan, max_new_tokens=3)
        assert torch.equal(t1[0], tokens[i])
        assert torch.allclose(o1.logits[0], out.logits[i], atol=1e-5)
        assert int(o1.vision_out[0]) == int(out.vision_out[i])


def test_window_merge_hand_case_and_reference():
    torch.manual_seed(1)
    grid, C = 6, 8
    h = torch.randn(2, 1 + grid * grid, C)
    # window (0, 0) of image 0: all nine tokens identical -> score 1 -> merged
    members = [1 + y * grid + x for y in range(3) for x in range(3)]
    h[0, members] = torch.randn(C)
    out, valid, size = mustdrop.window_merge(h, grid, 3, threshold=0.9)
    ref_out, ref_valid = mustdrop.window_merge_ref(h, grid, 3, threshold=0.9)
    assert torch.equal(valid, ref_valid) and torch.allclose(out, ref_out, atol=1e-6)
    assert valid[0, members[:-1]].sum() == 0 and valid[0, members[-1]] and size[0, members[-1], 0] == 9
    assert valid[1].all() and valid[0].sum() == 1 + 36 - 8  # random windows stay
    assert valid[:, 0].all()  # CLS
    with pytest.raises(ValueError, match="tiled"):
        mustdrop.window_merge(torch.randn(1, 1 + 25, C), 5, 3)


def test_dual_attention_rule_hand_built():
    # sequence: [prefix, v0, v1, v2, v3, text, text]; one head
    kind = torch.tensor([[PREFIX, VISION, VISION, VISION, VISION, TEXT, TEXT]])
    valid = torch.ones_like(kind, dtype=torch.bool)
    key = torch.tensor([[False, False, False, False, True, False, False]])
    probs = torch.zeros(1, 1, 7, 7)
    # text rows' attention to v0..v3: v0 strong in sum, v1 weak sum but one strong hit, v2 weak, v3 weak (key)
    probs[0, 0, 5, 1:5] = torch.tensor([0.40, 0.01, 0.01, 0.01])
    probs[0, 0, 6, 1:5] = torch.tensor([0.40, 0.30, 0.01, 0.01])
    keep = mustdrop.dual_attention_keep(probs, kind, valid, key, global_thr=0.1, individual_thr=0.2)
    # g = [0.8, 0.31, 0.02, 0.02], total 1.15 -> gamma*total = 0.115; max = [0.4, 0.3, 0.01, 0.01]
    assert keep.tolist() == [[True, True, True, False, True, True, True]]
    # with a huge individual threshold only the global rule protects: v1 (0.31 >= 0.115) still kept
    keep = mustdrop.dual_attention_keep(probs, kind, valid, key, global_thr=0.5, individual_thr=1.0)
    assert keep.tolist() == [[True, True, False, False, True, True, True]]


def test_fastv_rule_hand_built():
    kind = torch.tensor([[PREFIX, VISION, VISION, VISION, TEXT]])
    valid = torch.ones_like(kind, dtype=torch.bool)
    probs = torch.zeros(1, 2, 5, 5)
    probs[0, :, -1, 1:4] = torch.tensor([0.1, 0.5, 0.3])
    keep = fastv.fastv_keep(probs, kind, valid, keep=2)
    assert keep.tolist() == [[True, False, True, True, True]]
    assert fastv.budget_matched_keep(10.0, 40.0, 16, 2) == 6


def test_stage3_prunes_cache_to_final_survivors(setup):
    model, _, _, px, prompts = setup
    out = R.prefill(model, px, prompts, _plan(stage3=True))
    full = R.prefill(model, px, prompts, _plan(stage3=False))
    final = int(out.vision_out.max())
    for li, c in enumerate(out.cache):
        n_valid = c.valid.sum(1)
        if li >= 1:  # first pruning layer and after: only the tokens alive after the last drop
            assert torch.equal(n_valid, full.cache[-1].valid.sum(1))
        else:
            assert torch.equal(n_valid, full.cache[0].valid.sum(1))
    assert R.kv_bytes(out.cache) < R.kv_bytes(full.cache)
    assert final <= int(full.vision_in.max())
    assert torch.equal(out.logits, full.logits)  # stage 3 does not change prefill
    first = min(_plan().drop_layers)
    for li, c in enumerate(full.cache):  # the grouped fast path == the per-layer reference
        ref = R._prune_cache(c, full.cache[-1].tid, full.cache[-1].valid) if li >= first else c
        for name in ("k", "v", "valid", "tid"):
            assert torch.equal(getattr(out.cache[li], name), getattr(ref, name)), (li, name)


def test_pitome_in_tower_and_save_load_roundtrip(setup, tmp_path):
    from compression import pitome

    model, tok, cfg, px, prompts = setup
    ref = R.prefill(model, px, prompts).logits
    save_tiny_llava(model, tok, cfg, tmp_path / "m")
    loaded = load_llava(tmp_path / "m")
    assert loaded.tiny and torch.allclose(R.prefill(loaded.model, px, prompts).logits, ref, atol=1e-6)
    pitome.patch(loaded.model, ratio=0.5)
    out = R.prefill(loaded.model, px, prompts)
    assert int(out.vision_in[0]) == 36 // 2  # one merging vision layer runs before the feature layer
    pitome.unpatch(loaded.model)


def test_positions_kept_or_compacted(setup):
    model, _, _, px, prompts = setup
    ref = R.prefill(model, px, prompts)
    keep_all = R.DropPlan(drop_layers=(1,), rule=lambda li, probs, ctx: ctx["valid"], compact_positions=True)
    assert torch.allclose(R.prefill(model, px, prompts, keep_all).logits, ref.logits, atol=1e-6)
    kept = R.prefill(model, px, prompts, _plan(stage1=False))  # stage 1 shortens the sequence itself
    compacted = R.prefill(model, px, prompts, _plan(stage1=False, compact_positions=True))
    assert (kept.vision_out < kept.vision_in).all()
    assert torch.equal(kept.next_pos, ref.next_pos)  # original RoPE positions survive the drops
    assert (compacted.next_pos < kept.next_pos).all()  # released-code behaviour: renumbered


def test_oracle_rule_keeps_exactly_the_object_tokens():
    from compression.llava_eval import oracle_plan

    # two rows, left padded; vision tokens at positions 2..5 = patches 0..3 of a 2x2 grid
    kind = torch.tensor([[PREFIX, PREFIX, VISION, VISION, VISION, VISION, TEXT],
                         [0, PREFIX, VISION, VISION, VISION, VISION, TEXT]])
    valid = kind != 0
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]])
    objects = torch.tensor([[False, True, True, False], [True, False, False, False]])
    plan = oracle_plan(2, objects)
    assert plan.drop_layers == (2,)
    keep = plan.rule(2, torch.zeros(2, 1, 7, 7), {"kind": kind, "valid": valid, "pos": pos, "key": torch.zeros_like(valid)})
    assert keep.tolist() == [[True, True, False, True, True, False, True],
                             [False, True, True, False, False, False, True]]


def test_oracle_arm_on_the_runner_keeps_the_object_count(setup, tmp_path):
    from compression.llava_eval import LlavaArm, evaluate_llava_arm, load_vqa

    model, tok, cfg, _, _ = setup
    save_tiny_llava(model, tok, cfg, tmp_path / "m")
    data = load_vqa(str(tmp_path / "m"), "val", 6)
    assert data.objects.shape == (6, 36) and data.objects.any(1).all() and not data.objects.all(1).any()
    row = evaluate_llava_arm(model, LlavaArm("oracle", "oracle", oracle_layer=1), data, batch_size=4, repeats=0,
                             flops_batch=2)
    per_layer = [float(c) for c in row["vis_tokens_per_layer"].split(",")]
    assert per_layer[:2] == [36.0, 36.0]
    assert per_layer[2] == pytest.approx(float(data.objects.sum(1).float().mean()), abs=0.05)
    assert row["gflops_tower"] > 0 and 0 < row["gflops_lm_vision"] < row["gflops_vision"]
    with pytest.raises(ValueError, match="object patches"):
        LlavaArm("oracle", "oracle").plan(4)


def test_training_key_dropout_equals_runner_drop_after_a_layer(setup):
    """keys_dropped (the tiny LLaVA's token-dropout training) masks exactly what the runner removes."""
    from compression.tiny_llava import keys_dropped

    model, tok, cfg, px, prompts = setup
    prompts = [prompts[0]] * len(px)  # one question for every image: equal lengths, no padding in either path
    ids = torch.stack(prompts)
    L = ids.shape[1]
    vis = (ids == tok.image_id)
    g = torch.Generator().manual_seed(3)
    drop = vis & (torch.rand(ids.shape, generator=g) < 0.6)
    first = 2  # layers 2, 3 lose the keys == the runner drops the tokens after layer 1
    plan = R.DropPlan(drop_layers=(first - 1,), rule=lambda li, probs, ctx: ctx["valid"] & ~drop)
    ref = R.prefill(model, px, prompts, plan).logits
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), keys_dropped(model, drop, first):
            got = model(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids)).logits[:, L - 1]
        with torch.no_grad():
            full = model(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids)).logits[:, L - 1]
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(full, ref, atol=1e-3)  # the drop matters, and the hooks were removed


def test_merge_aware_training_inputs_equal_runner_stage1(setup):
    """stage1_merged_inputs + keys_dropped(members, 0) (merge-aware training) computes what the runner
    computes with MustDrop's stage 1 on, row by row: merged rows as stage 1, the other rows undropped."""
    from compression.tiny_llava import keys_dropped, stage1_merged_inputs

    model, tok, cfg, px, prompts = setup
    prompts = [prompts[0]] * len(px)
    ids = torch.stack(prompts)
    L = ids.shape[1]
    tau = 0.02  # the random nano tower's window scores are ~0-0.04: merges one of the four windows per row
    stage1 = R.DropPlan(stage1=lambda h, grid: mustdrop.window_merge(h, grid, 3, tau))
    merged_ref = R.prefill(model, px, prompts, stage1)
    plain_ref = R.prefill(model, px, prompts).logits
    rows = torch.tensor([True, False, True])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            embeds, members, positions = stage1_merged_inputs(model, ids, px, rows, tau)
            with keys_dropped(model, members, 0):
                got = model(inputs_embeds=embeds, position_ids=positions,
                            attention_mask=torch.ones_like(ids)).logits[:, L - 1]
            none, no_members, arange = stage1_merged_inputs(model, ids, px, torch.zeros(3, dtype=torch.bool), tau)
            plain = model(inputs_embeds=none, attention_mask=torch.ones_like(ids)).logits[:, L - 1]
    finally:
        model.set_attn_implementation("sdpa")
    n_members = members.sum(1)
    assert n_members[1] == 0 and not no_members.any() and torch.equal(arange, torch.arange(L).expand(3, -1))
    assert torch.equal(positions[:, -1], L - 1 - n_members)  # the members take no RoPE position
    assert (n_members[rows] % 8 == 0).all() and int(n_members[rows].sum()) > 0  # whole windows: 8 members each
    assert torch.equal(36 - n_members[rows], merged_ref.vision_in[rows])
    assert torch.allclose(got[rows], merged_ref.logits[rows], atol=1e-5), (got[rows] - merged_ref.logits[rows]).abs().max()
    assert torch.allclose(got[1], plain_ref[1], atol=1e-5)
    assert torch.allclose(plain, plain_ref, atol=1e-5)  # no merged row: the HF forward with pixel_values



def test_interleaved_prefill_timing_covers_every_arm_and_unpatches(setup):
    from compression.llava_eval import LlavaArm, VQAData, time_prefill_interleaved

    model, _, _, px, prompts = setup
    ref = R.prefill(model, px, prompts).logits
    data = VQAData(px, prompts, torch.zeros(len(px), dtype=torch.long), torch.zeros(len(px), dtype=torch.long))
    arms = [LlavaArm("none", "none"), LlavaArm("pitome", "pitome", pitome_ratio=0.75),
            LlavaArm("mustdrop", "mustdrop", mustdrop.MustDropConfig(merge_threshold=0.3, prune_layers=(1, 2)))]
    rates = time_prefill_interleaved(model, arms, data, batch_size=2, rounds=2)
    assert len(rates) == 3 and all(r > 0 and r == r and r != float("inf") for r in rates)
    assert torch.equal(R.prefill(model, px, prompts).logits, ref)  # PiToMe's patch was removed


def test_small_attention_path_equals_sdpa(setup, monkeypatch):
    """The two-matmul attention used for few keys gives SDPA's result (prefill with drops, both paths)."""
    model, _, _, px, prompts = setup
    plan = _plan()
    monkeypatch.setattr(R, "SMALL_ATTENTION_KEYS", 0)  # SDPA everywhere
    ref = R.generate(model, px, prompts, plan, max_new_tokens=3)
    monkeypatch.setattr(R, "SMALL_ATTENTION_KEYS", 10**6)  # two matmuls everywhere
    got = R.generate(model, px, prompts, plan, max_new_tokens=3)
    assert torch.equal(got[0], ref[0]) and torch.allclose(got[1].logits, ref[1].logits, atol=1e-5)


@pytest.mark.parametrize("method", ["none", "mustdrop", "fastv"])
def test_llava_lm_flops_counter_equals_analytic(setup, method):
    """The LM's measured prefill FLOPs (FlopCounterMode, batch 1) equal the analytic Llama count from the
    per-layer token counts, with and without drops."""
    from compression.llava_eval import LlavaArm, VQAData, evaluate_llava_arm

    model, _, _, px, prompts = setup
    data = VQAData(px, prompts, torch.zeros(len(px), dtype=torch.long), torch.zeros(len(px), dtype=torch.long))
    arm = {"none": LlavaArm("none", "none"),
           "mustdrop": LlavaArm("md", "mustdrop", mustdrop.MustDropConfig(merge_threshold=0.02, global_thr=0.5,
                                                                          individual_thr=0.5, prune_layers=(1, 2))),
           "fastv": LlavaArm("fastv", "fastv", fastv=fastv.FastVConfig(1, 5))}[method]
    row = evaluate_llava_arm(model, arm, data, batch_size=3, repeats=0, flops_batch=3)
    assert row["gflops_lm"] == pytest.approx(row["gflops_lm_analytic"], rel=1e-12)
    if method != "none":
        assert row["vis_tokens_final"] < 36


def test_packed_layers_equal_padded_layers(setup, monkeypatch):
    """Position-wise parts on the packed valid tokens (rows of different lengths) == the padded layout."""
    model, _, _, px, prompts = setup
    plan = _plan(stage3=True)
    monkeypatch.setattr(R, "PACK_BELOW", 0.0)  # never pack
    ref_tokens, ref = R.generate(model, px, prompts, plan, max_new_tokens=3)
    monkeypatch.setattr(R, "PACK_BELOW", 2.0)  # pack every prefill layer
    tokens, out = R.generate(model, px, prompts, plan, max_new_tokens=3)
    assert torch.equal(tokens, ref_tokens) and torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert out.vision_tokens == ref.vision_tokens
    for c, r in zip(out.cache, ref.cache):
        assert torch.equal(c.valid, r.valid) and torch.equal(c.tid, r.tid)
        m = c.valid[:, None, :, None]
        assert torch.allclose(c.k * m, r.k * m, atol=1e-5) and torch.allclose(c.v * m, r.v * m, atol=1e-5)


def test_compress_llava_cli_on_the_tiny_model(setup, tmp_path):
    import json

    from workbench.cli import main

    model, tok, cfg, _, _ = setup
    save_tiny_llava(model, tok, cfg, tmp_path / "m")
    out = tmp_path / "out"
    assert main(["compress", "llava", "--ckpt", str(tmp_path / "m"), "--method", "mustdrop", "fastv", "--num-samples", "4",
                 "--batch-size", "2", "--repeats", "1", "--merge-threshold", "0.02", "--out", str(out)]) == 0
    rows = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) >= {"none", "mustdrop s1", "mustdrop s1+s2", "mustdrop s1+s2+s3"}
    assert all(r["answers_per_s"] > 0 and r["answers_per_s_alone"] > 0 for r in rows.values())
    assert rows["mustdrop s1"]["vis_tokens_in"] < 36 <= rows["none"]["vis_tokens_in"]  # tau 0.02 merges windows
    assert rows["none"]["gflops_lm"] == pytest.approx(rows["none"]["gflops_lm_analytic"], rel=1e-12)
    assert (out / "acc_vs_flops.png").is_file()
    with pytest.raises(SystemExit, match="for a LLaVA-1.5 directory"):
        main(["compress", "llava", "--ckpt", str(tmp_path / "m"), "--image", "x.png", "--question", "what ?"])
    with pytest.raises(SystemExit, match="--device / --dtype"):
        main(["compress", "llava", "--ckpt", str(tmp_path / "m"), "--device", "cuda"])
