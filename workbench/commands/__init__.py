"""The one place where ``vtw`` subcommands are registered.

Each entry maps a subcommand name to ``(module, one-line help)``. The module is imported only when
its subcommand runs, so ``vtw --help`` stays fast. A command module defines
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
The Lightning subcommands (fit/validate/test/predict) are handled by ``workbench.lightning_cli``.
"""

from __future__ import annotations

LIGHTNING_SUBCOMMANDS: dict[str, str] = {
    "fit": "Train a model from a YAML config (LightningCLI; --config configs/X.yaml, --print_config)",
    "validate": "Run validation of a model/config on its datamodule (LightningCLI)",
    "test": "Run the test loop of a model/config (LightningCLI)",
    "predict": "Run prediction with a model/config (LightningCLI)",
}

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("workbench.commands.demo", "Run the main job on built-in data and write runs/demo/"),
    "tokenize": ("workbench.commands.tokenize", "Encode an image dataset with a trained tokenizer into token shards"),
    "compress": ("workbench.commands.compress", "Token merging/dropping (ToMe, PiToMe, MustDrop, FastV): FLOPs, tokens, speed, accuracy"),
    "generate": ("workbench.commands.generate", "Sample images from a trained GPT + tokenizer (CFG, top-k/p, seed): PNG grid + JSON"),
    "eval-gen": ("workbench.commands.eval_gen", "Score generated images: shapes-classifier class accuracy, Frechet distance (+ Inception FID/IS)"),
    "synth-em": ("workbench.commands.synth_em", "Write a synthetic EM volume (CREMI-layout HDF5) with exact neuron ids"),
    "segment": ("workbench.commands.segment", "Segment an EM volume with an affinity checkpoint (sliding window + waterz), with metrics"),
}


def register(name: str, module: str, help_line: str) -> None:
    """Register a subcommand (used by plugins; built-in commands are listed in ``COMMANDS``)."""
    if name in COMMANDS or name in LIGHTNING_SUBCOMMANDS:
        raise ValueError(f"vtw subcommand {name!r} is already registered")
    COMMANDS[name] = (module, help_line)
