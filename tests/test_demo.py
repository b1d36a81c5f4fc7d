"""The whole ``vtw demo`` chain with smoke budgets: every stage runs and leaves its files."""

import json

import pytest


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path):
    from workbench.cli import main
    from workbench.demo_stages import STAGES

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for module in STAGES:
        stage = module.rsplit(".", 1)[-1]
        assert any(key.startswith(f"{stage}/") for key in metrics), f"stage {stage} wrote no metrics"
    report = (out / "report.md").read_text()
    assert report.startswith("# Vision-token workbench demo")
    for link in [line.split("](")[1].split(")")[0] for line in report.splitlines() if "![" in line]:
        assert (out / link).is_file(), f"report links a missing picture {link}"
    assert (out / "classifier" / "model.safetensors").is_file()
