"""``vtw fit|validate|test|predict``: Lightning's ``LightningCLI`` with the workbench's defaults.

Any LightningModule / LightningDataModule is selected from YAML by ``class_path`` (subclass mode for
both). Defaults added here:

- ``RichProgressBar`` (left out with ``--trainer.enable_progress_bar false``);
- ``ModelCheckpoint`` (``--checkpoint.*``): last + best by ``val/loss``, written to
  ``<trainer.default_root_dir>/checkpoints`` so that ``--ckpt_path last`` of a later run finds it;
- loggers: CSV (``metrics.csv``) and TensorBoard when installed, under ``trainer.default_root_dir``,
  unless the config names its own ``trainer.logger``;
- ``seed_everything`` (default seed 0).

Scale-out (``--trainer.strategy=ddp|fsdp``, ``--trainer.devices``, ``--trainer.num_nodes``,
``--trainer.precision=bf16-mixed``) is Lightning's job: the same configs run unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def _checkpoint_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or ".", "checkpoints")


class WorkbenchCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-step{step}",
            "checkpoint.auto_insert_metric_name": False,  # '/' in metric names would create folders
            "trainer.default_root_dir": "runs/default",
        })
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(trainer_config.get("default_root_dir") or "runs/default"))
        if trainer_config.get("enable_progress_bar") is False:  # e.g. logging to a file: no default progress bar
            callbacks = self.trainer_defaults.get("callbacks", [])
            self.trainer_defaults["callbacks"] = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        return super().instantiate_trainer(**kwargs)


def default_loggers(root: str) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=root, name="csv")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    # a distinct name keeps both loggers on the same version number (two loggers sharing save_dir/name
    # would be given different versions)
    loggers.append(TensorBoardLogger(save_dir=root, name="tb", version=loggers[0].version))
    return loggers


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> WorkbenchCLI:
    """Run ``vtw <subcommand> ...`` (``args`` without the program name)."""
    return WorkbenchCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [RichProgressBar(leave=True)]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "vtw"},
        args=args,
        run=run,
    )
