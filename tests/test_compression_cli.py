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


def test_tome_on_pitome_schedule_keeps_the_same_tokens_per_block():
    """The benchmark's matched arm: ToMe given PiToMe's per-block removals merges exactly as many tokens."""
    import torch

    from compression.vit_eval import Arm, evaluate_arm, removed_per_layer
    from vision.classifier import build_vit, classifier_config

    torch.manual_seed(0)
    net = build_vit(classifier_config("tiny", embed_dim=48, depth=4, num_heads=2)).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 30, (6,))
    pitome_row = evaluate_arm(net, Arm("pitome", ratio=0.8), images, labels, batch_size=6, repeats=0)
    schedule = removed_per_layer(pitome_row)
    tokens = [int(t) for t in pitome_row["tokens"].split(",")] + [pitome_row["tokens_final"]]
    assert len(schedule) == 4 and sum(schedule) == tokens[0] - tokens[-1] and min(schedule) > 0
    tome_row = evaluate_arm(net, Arm("tome", r_schedule=schedule, label="tome @ pitome"), images, labels,
                            batch_size=6, repeats=0)
    assert tome_row["arm"] == "tome @ pitome"
    assert (tome_row["tokens"], tome_row["tokens_final"]) == (pitome_row["tokens"], pitome_row["tokens_final"])
    # same tokens per block; only the matching cost differs (PiToMe's energy uses all pairs, ToMe's A x B)
    assert tome_row["gflops"] == pytest.approx(pitome_row["gflops"], rel=0.05)


def test_compress_llava_rejects_a_directory_that_is_not_llava(tmp_path, capsys):
    """A non-LLaVA save_pretrained directory must not load as a default-size (7B) random LLaVA."""
    from vision.classifier import build_vit, classifier_config, save_classifier

    cfg = classifier_config("tiny", embed_dim=32, depth=1, num_heads=2)
    save_classifier(build_vit(cfg), cfg, None, tmp_path / "cls")
    assert main(["compress", "llava", "--ckpt", str(tmp_path / "cls")]) == 2
    err = capsys.readouterr().err
    assert "not a LLaVA config" in err and str(tmp_path / "cls" / "config.json") in err
