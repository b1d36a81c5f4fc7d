"""TokenUnify tokens/objectives, SegMamba, affinity targets, metrics vs scikit-image/waterz, fine-tune + vtw segment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision.em_segmentation import (
    adapted_rand,
    agglomerate,
    load_matching_weights,
    seg_to_affinity,
    voi,
    weight_binary_ratio,
    widen_border,
)
from vision.tokenunify import (
    NextTokenHead,
    SegMamba,
    TokenUnifyConfig,
    TokenUnifyModel,
    next_all_corruption,
    next_token_target,
    patchify,
    random_token_corruption,
    segmamba_config,
    unpatchify,
)

TOKEN = (2, 4, 4)


def test_patchify_z_major_order_and_round_trip():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(1, 1, 4, 8, 8)
    tok = patchify(x, TOKEN)  # grid (2, 2, 2)
    assert tok.shape == (1, 8, 32)
    # token 1 is (z0, y0, x1): its first voxel is x[0, 0, 0, 0, 4]; token 2 is (z0, y1, x0); token 4 is (z1, ...)
    assert tok[0, 1, 0] == x[0, 0, 0, 0, 4] and tok[0, 2, 0] == x[0, 0, 0, 4, 0] and tok[0, 4, 0] == x[0, 0, 2, 0, 0]
    assert torch.equal(unpatchify(tok, TOKEN, (4, 8, 8)), x)


def test_random_token_corruption_masked_fraction():
    x = torch.rand(3, 1, 4, 16, 16)  # 2*4*4 = 32 tokens
    g = torch.Generator().manual_seed(0)
    xt, mask = random_token_corruption(x, TOKEN, mask_ratio=0.25, fill="zero", generator=g)
    assert mask.sum(1).tolist() == [8, 8, 8]
    tok, tok_t = patchify(x, TOKEN), patchify(xt, TOKEN)
    assert torch.all(tok_t[mask] == 0) and torch.equal(tok_t[~mask], tok[~mask])
    _, m2 = random_token_corruption(x, TOKEN, mask_ratio=None, generator=g)  # U(0.2, 0.8) per sample
    assert all(0.2 * 32 - 1 <= int(k) <= 0.8 * 32 + 1 for k in m2.sum(1))
    xn, mn = random_token_corruption(x, TOKEN, mask_ratio=0.5, fill="noise", generator=g)
    assert patchify(xn, TOKEN)[mn].std() > 0.5  # N(0, 1) fill


def test_next_all_keeps_prefix_and_next_token_target():
    x = torch.rand(2, 1, 4, 16, 16)
    xt, n = next_all_corruption(x, TOKEN, fill="zero", prefix=torch.tensor([3, 10]))
    tok, tok_t = patchify(x, TOKEN), patchify(xt, TOKEN)
    assert torch.equal(tok_t[0, :3], tok[0, :3]) and torch.all(tok_t[0, 3:] == 0)
    assert torch.equal(tok_t[1, :10], tok[1, :10]) and torch.all(tok_t[1, 10:] == 0)
    target = next_token_target(x, n, TOKEN)  # (B, 1, 2, 4, 4)
    assert torch.equal(target[0], x[0, :, 0:2, 0:4, 12:16])  # token 3 = (z0, y0, x3)
    assert torch.equal(target[1], x[1, :, 0:2, 8:12, 8:12])  # token 10 = (z0, y2, x2)
    _, n_rand = next_all_corruption(x, TOKEN, generator=torch.Generator().manual_seed(1))
    assert all(1 <= int(k) < 32 for k in n_rand)


def test_next_token_head_sized_from_config():
    head = NextTokenHead((16, 48, 32), (4, 8, 8))
    assert head(torch.randn(2, 1, 16, 48, 32)).shape == (2, 1, 4, 8, 8)


@pytest.mark.slow
def test_pretraining_objectives_and_segmamba_shapes():
    torch.manual_seed(0)
    model = TokenUnifyModel(TokenUnifyConfig(crop=(16, 32, 32), token=(4, 16, 16),
                                             model_overrides=dict(feat_size=(4, 8, 8, 8), hidden_size=8)))
    x = torch.rand(1, 1, 16, 32, 32)
    out = model(x)
    assert set(out.losses) == {"random", "next_all", "next"} and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="objectives"):
        model(x, ("bogus",))
    out.loss.backward()
    assert model.next_head.fc.weight.grad is not None
    with pytest.raises(ValueError, match="divisible"):
        SegMamba(segmamba_config("tiny"))(torch.rand(1, 1, 8, 32, 32))


def test_affinity_targets_hand_made():
    lab = np.zeros((2, 3, 4), np.int64)
    lab[:, :, :2] = 1
    lab[:, :, 2:] = 2
    lab[1, 0, 0] = 0
    aff = seg_to_affinity(lab).numpy()  # (3, Z, Y, X): z, y, x
    assert aff.shape == (3, 2, 3, 4)
    assert aff[0, 0].sum() == 0  # no z-neighbour for the first section
    assert aff[0, 1, 0, 0] == 0 and aff[0, 1, 0, 1] == 1  # background never affine
    assert aff[2, 0, 0, 1] == 1 and aff[2, 0, 0, 2] == 0 and aff[2, 0, 0, 3] == 1  # x-boundary between 1 and 2
    assert aff[1, 0, 0].sum() == 0 and aff[1, 0, 1].sum() == 4
    wide = widen_border(lab[:1])
    assert (wide[0, :, 1] == 0).all() and (wide[0, :, 2] == 0).all() and (wide[0, :, 0] == 1).all()
    w = weight_binary_ratio(torch.tensor([1.0, 1, 1, 0]))  # positives 75%: negatives weighted 3
    assert torch.allclose(w, torch.tensor([1.0, 1, 1, 3]))


def test_metrics_exact_cases_and_agree_with_skimage_and_waterz():
    import waterz
    from skimage.metrics import adapted_rand_error, variation_of_information

    gt = np.zeros((2, 8, 8), np.uint64)
    gt[:, :, :4], gt[:, :, 4:] = 1, 2
    assert voi(gt, gt) == (0.0, 0.0) and adapted_rand(gt, gt) == 0.0
    split = gt.copy()
    split[:, :4, :4] = 3  # one gt segment split in two
    s, m = voi(split, gt)
    assert s > 0 and m == 0.0
    merged = np.ones_like(gt)
    s, m = voi(merged, gt)
    assert s == 0.0 and m > 0
    rng = np.random.default_rng(0)
    gt_r = rng.integers(0, 5, (4, 10, 10)).astype(np.uint64)
    seg_r = rng.integers(1, 7, (4, 10, 10)).astype(np.uint64)
    sk_split, sk_merge = variation_of_information(gt_r, seg_r, ignore_labels=(0,))
    assert np.allclose(voi(seg_r, gt_r), (sk_split, sk_merge))
    assert np.isclose(adapted_rand(seg_r, gt_r), adapted_rand_error(gt_r, seg_r, ignore_labels=(0,))[0])
    gt_w = rng.integers(1, 5, (4, 10, 10)).astype(np.uint64)  # waterz ignores nothing: compare without label 0
    ref = waterz.evaluate(seg_r, gt_w)
    s, m = voi(seg_r, gt_w, ignore_gt=())
    assert np.isclose(s, ref["voi_split"]) and np.isclose(m, ref["voi_merge"]), (s, m, ref)
    # waterz reports Rand split/merge as pair precision/recall scores counting self-pairs; the adapted Rand
    # error from them is 1 - F; ours excludes self-pairs (scikit-image's convention): close, not equal
    waterz_are = 1 - 2 / (1 / ref["rand_split"] + 1 / ref["rand_merge"])
    assert abs(adapted_rand(seg_r, gt_w, ignore_gt=()) - waterz_are) < 0.02


def test_agglomeration_recovers_clean_affinities():
    lab = np.zeros((4, 24, 24), np.int64)
    lab[:, :, :12], lab[:, :, 12:] = 1, 2
    aff = seg_to_affinity(widen_border(lab)).numpy()
    for backend in ("waterz", "skimage"):
        (t, seg), = list(agglomerate(aff, [0.5], backend=backend))
        assert voi(seg, lab)[1] < 0.05 and adapted_rand(seg, lab) < 0.1, backend


def test_weight_loading_report_and_zero_match_error():
    net = SegMamba(segmamba_config("tiny", feat_size=(4, 8, 8, 8), hidden_size=8, out_chans=3))
    src = SegMamba(segmamba_config("tiny", feat_size=(4, 8, 8, 8), hidden_size=8, out_chans=1))
    report = load_matching_weights(net, {f"model.net.{k}": v for k, v in src.state_dict().items()})
    assert "vit.downsample_layers.0.weight" in report["loaded"] and "out.conv.conv.weight" in report["missing"]
    assert torch.equal(net.state_dict()["vit.downsample_layers.0.weight"], src.state_dict()["vit.downsample_layers.0.weight"])
    with pytest.raises(ValueError, match="no weights matched"):
        load_matching_weights(net, {"foo.bar": torch.zeros(3)})


@pytest.mark.slow
def test_finetune_from_pretraining_checkpoint_and_segment_end_to_end(tmp_path, capsys):
    import json

    import h5py
    from lightning.pytorch import Trainer

    from datasets.em import EMDataModule
    from datasets.synth_em import synth_em_to_h5
    from vision.tokenunify_lit import AffinitySegLit, TokenUnifyPretrainLit
    from workbench.cli import main

    small = dict(feat_size=(4, 8, 8, 8), hidden_size=8)
    crop = (16, 32, 32)
    kw = dict(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=1, num_sanity_val_steps=0)
    dm = EMDataModule(with_labels=True, crop_size=crop, batch_size=1, train_samples=4, val_samples=1,
                      synthetic_shape=(32, 64, 64), cache_dir=str(tmp_path))
    pre = TokenUnifyPretrainLit(crop=crop, token=(4, 16, 16), model_overrides=small,
                                stages=[{"objectives": ["random"], "steps": 1}, {"objectives": ["next_all", "next"], "steps": 1}])
    assert pre.objectives_at(0) == ("random",) and pre.objectives_at(1) == ("next_all", "next")
    trainer = Trainer(default_root_dir=tmp_path / "pre", **kw)
    trainer.fit(pre, datamodule=dm)
    ckpt = tmp_path / "pre.ckpt"
    trainer.save_checkpoint(ckpt)
    seg = AffinitySegLit(crop=crop, pretrained=str(ckpt), model_overrides=small)
    out = capsys.readouterr().out
    assert "[weights]" in out and "loaded" in out
    assert seg.load_report and len(seg.load_report["loaded"]) > 10
    trainer = Trainer(default_root_dir=tmp_path / "ft", **kw)
    trainer.fit(seg, datamodule=dm)
    seg_ckpt = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(seg_ckpt)

    vol = tmp_path / "vol.h5"
    synth_em_to_h5(vol, shape=(16, 40, 48), seed=9)
    out_h5 = tmp_path / "out" / "seg.h5"
    rc = main(["segment", str(vol), "--checkpoint", str(seg_ckpt), "--out", str(out_h5), "--gt",
               f"{vol}:volumes/labels/neuron_ids", "--thresholds", "0.3", "0.6"])
    assert rc == 0
    with h5py.File(out_h5) as f:
        assert f["volumes/segmentation/threshold_0.30"].shape == (16, 40, 48)
    report = json.loads((tmp_path / "out" / "seg_report" / "metrics.json").read_text())
    assert [r["threshold"] for r in report["rows"]] == [0.3, 0.6] and "voi_split" in report["rows"][0]
    assert (tmp_path / "out" / "seg_report" / "slices.png").exists()
    # bad inputs: missing key, checkpoint of another task -> clear error, no output file left behind
    bad_out = tmp_path / "bad" / "seg.h5"
    assert main(["segment", f"{vol}:volumes/nope", "--checkpoint", str(seg_ckpt), "--out", str(bad_out)]) == 2
    err = capsys.readouterr().err  # one line naming the file and key, no traceback
    assert "vtw segment: error:" in err and "volumes/nope" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="not an affinity"):
        main(["segment", str(vol), "--checkpoint", str(ckpt), "--out", str(bad_out)])
    # an affinity checkpoint whose weights do not fit its recorded model: the bad keys are named
    state = torch.load(seg_ckpt, map_location="cpu", weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("net.decoder")}
    torch.save(state, tmp_path / "truncated.ckpt")
    with pytest.raises(SystemExit, match=r"missing keys \(\d+\): decoder"):
        main(["segment", str(vol), "--checkpoint", str(tmp_path / "truncated.ckpt"), "--out", str(bad_out)])
    assert not bad_out.exists()
