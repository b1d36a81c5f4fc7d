"""`vtw compress vit` end to end on a tiny random classifier (table, plot, FLOP cross-check)."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main


@pytest.mark.slow
def test_compress_vit_cli(tmp_path):
    from vision.classifier import build_vit, classifier_config, save_classifier

    cfg = classifier_config("tiny", embed_dim=48, depth=3, num_heads=2)
    save_classifier(build_vit(cfg), cfg, None, tmp_path / "cls")
    out = tmp_path / "vit"
    rc = main(["compress", "vit", "--ckpt", str(tmp_path / "cls"), "--method", "tome", "pitome", "--r", "4",
               "--ratio", "0.8", "--num-samples", "16", "--batch-size", "8", "--time-batch", "8", "--repeats", "1",
               "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "tome", "pitome"]
    assert rows[0]["gflops"] == pytest.approx(rows[0]["gflops_analytic"])  # counter == analytic, unmerged
    assert rows[1]["tokens"] == "65,61,57" and rows[1]["gflops"] < rows[0]["gflops"]
    assert (out / "acc_vs_flops.png").stat().st_size > 0


def test_compress_rejects_missing_ckpt(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["compress", "vit", "--ckpt", str(tmp_path / "nope")])
