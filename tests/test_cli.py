"""End-to-end tests of the ``vtw`` command line (LightningCLI defaults, resume, DDP, registry)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VTW = [sys.executable, "-m", "workbench"]
TINY = [
    "--config", str(REPO / "configs/quickstart.yaml"),
    "--model.init_args.depth=1", "--model.init_args.embed_dim=32", "--model.init_args.num_heads=2",
    "--data.init_args.train_samples=256", "--data.init_args.val_samples=64", "--data.init_args.batch_size=16",
    "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false",
]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([*VTW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"vtw {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_help_lists_every_command_without_heavy_imports():
    from workbench.commands import COMMANDS, LIGHTNING_SUBCOMMANDS

    code = (
        "import sys, workbench.cli as c; c.main(['--help']);"
        "heavy=[m for m in ('torch','lightning','timm','diffusers','transformers','open_clip') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    for name in [*LIGHTNING_SUBCOMMANDS, *COMMANDS]:
        assert f"    {name}" in out, f"{name} missing from vtw --help"
    assert "HEAVY []" in out


def test_every_registered_command_module_has_its_entry_points():
    import importlib

    from workbench.commands import COMMANDS

    for module_name, _ in COMMANDS.values():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "add_arguments", None)), f"{module_name} lacks add_arguments"
        assert callable(getattr(module, "run", None)), f"{module_name} lacks run"


def test_unknown_command_is_a_clear_error(capsys):
    from workbench.cli import main

    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_print_config_resolves_defaults(tmp_path):
    out = _run(["fit", *TINY, "--print_config"], cwd=tmp_path).stdout
    assert "class_path: vision.classifier.ImageClassifier" in out
    assert "class_path: datasets.shapes.ShapesDataModule" in out
    assert "monitor: val/loss" in out  # the workbench's ModelCheckpoint defaults
    assert "save_last: true" in out


@pytest.mark.slow
def test_fit_writes_checkpoint_and_resumes_with_optimizer_state(tmp_path):
    _run(["fit", *TINY, "--trainer.max_steps=4"], cwd=tmp_path)
    ckpt_dir = tmp_path / "runs/quickstart/checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and any(p.name.startswith("best-") for p in ckpt_dir.iterdir())
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 4

    _run(["fit", *TINY, "--trainer.max_steps=6", "--ckpt_path", "last"], cwd=tmp_path)
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6
    # AdamW's per-parameter step counter continued from 4 instead of restarting at 0
    adam_steps = {int(state["step"]) for state in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6}
    # the resumed run trained only steps 4 and 5
    versions = sorted((tmp_path / "runs/quickstart/csv").iterdir())
    assert len(versions) == 2
    with open(versions[-1] / "metrics.csv") as handle:
        steps = {int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    assert steps and min(steps) >= 4


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu(tmp_path):
    _run(["fit", *TINY, "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--trainer.devices=2",
          "--trainer.strategy=ddp", "--trainer.precision=32-true"], cwd=tmp_path, timeout=400)
    checkpoint = torch.load(tmp_path / "runs/quickstart/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4  # last.ckpt is written at validation (every 2 steps)
    assert checkpoint["hyper_parameters"]["_class_path"] == "vision.classifier.ImageClassifier"


# Recipes that need no file from an earlier run or a data root (gpt_tiny_shapes reads the demo's token
# shards, the paper recipes read datasets and weights): each must build its model, data and trainer.
SELF_CONTAINED_CONFIGS = ["bae_tiny_shapes", "classifier_shapes", "llava_deep_shapes", "llava_sparse_shapes",
                          "llava_tiny_shapes", "quickstart", "seed_stage1_shapes", "tokenflow_shapes",
                          "tokenunify_pretrain_tiny", "vit_deep_shapes", "vit_small_shapes", "vqgan_tiny_shapes"]


@pytest.mark.parametrize("name", SELF_CONTAINED_CONFIGS)
def test_cpu_recipe_instantiates(name, tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar

    from workbench.lightning_cli import run_lightning_cli

    cli = run_lightning_cli(["--config", str(REPO / "configs" / f"{name}.yaml"), "--trainer.accelerator=cpu",
                             "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}",
                             "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    assert not any(isinstance(c, RichProgressBar) for c in cli.trainer.callbacks)  # the flag is honoured


def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from workbench.cli import main

    args = ["tokenize", "--tokenizer", str(tmp_path / "nope"), "--data", "shapes", "--split", "val",
            "--num-samples", "4", "--out", str(tmp_path / "shards")]
    monkeypatch.delenv("VTW_DEBUG", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtw tokenize: error: ") and str(tmp_path / "nope") in err and "Traceback" not in err
    assert not (tmp_path / "shards").exists()
    monkeypatch.setenv("VTW_DEBUG", "1")  # the traceback on request
    with pytest.raises(FileNotFoundError, match="nope"):
        main(args)
