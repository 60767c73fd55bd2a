"""The Lightning side of the ``zoo`` command: the run folder, checkpoints and CSV logging of
:class:`ZooCLI`, a LightningCLI in subclass mode. Imported only by the commands that train or
build a model, so ``zoo --help`` does not pay for importing Lightning. It imports nothing of
``zoo.cli`` or ``zoo.compare`` (they import it): the caller resolves the config and run folder."""
from __future__ import annotations

import argparse
import csv
import os
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from zoo.errors import ZooError, short_parse_error
from zoo.module import ZooModule
from zoo.predict import PredictionWriter


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (a resumed run appends) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # continue the existing header
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; a resumed run must keep it."""


class ZooCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives resuming: rows are appended, never discarded."""

    @property
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ZooCLI(LightningCLI):
    """LightningCLI that adds the zoo run folder, checkpointing and the data hook."""

    def __init__(self, *a, run_dir: Path, zoo_subcommand: str | None = None, **kw):
        self.run_dir = Path(run_dir)
        self.zoo_subcommand = zoo_subcommand
        super().__init__(*a, **kw)

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--expert_parallel", type=bool, default=False,
                            help="under a multi-process strategy (--trainer.strategy ddp), split every "
                                 "MoE layer's experts over the ranks (all-to-all token exchange)")

    def _instantiate_trainer(self, config, callbacks):
        if self.datamodule is not None:
            self.model.on_data(self.datamodule)
        self.model.expert_parallel = bool(self.config.get("expert_parallel", False))
        monitor = getattr(self.model, "monitor", None)
        ckpt_dir = self.run_dir / "checkpoints"
        # two callbacks: with a monitor, save_last only rewrites last.ckpt when a new best is
        # saved, so a run whose metric fell in its last epoch would resume from the best epoch
        callbacks = list(callbacks) + [
            # every training epoch end (after that epoch's validation, if any), also in epochs
            # that skip validation (check_val_every_n_epoch > 1)
            ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                            save_on_train_epoch_end=True, enable_version_counter=False),
        ]
        if monitor:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor,
                                             mode=getattr(self.model, "monitor_mode", "min"), save_top_k=1,
                                             enable_version_counter=False))
        if self.zoo_subcommand == "predict":
            callbacks.append(PredictionWriter(self.run_dir / "predict" / "predictions.pt"))
        config.setdefault("default_root_dir", str(self.run_dir))
        if config.get("logger") in (None, True):
            # fit logs at the run folder's top; validate/test/predict in a subfolder of their own
            version = "" if self.zoo_subcommand in (None, "fit") else self.zoo_subcommand
            config["logger"] = ZooCSVLogger(save_dir=str(self.run_dir), name="", version=version)
        return super()._instantiate_trainer(config, callbacks)


def build_cli(args: list[str], config: Path, run_dir: Path, run: bool = True,
              subcommand: str | None = None) -> ZooCLI:
    """Build (and by default run) the LightningCLI for ``args`` (which name ``--config config``);
    everything the run writes goes under ``run_dir``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        try:
            return ZooCLI(ZooModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          save_config_kwargs={"overwrite": True}, args=args, run=run, run_dir=Path(run_dir),
                          zoo_subcommand=subcommand, parser_kwargs={"exit_on_error": False},
                          load_from_checkpoint_support=False)
        except argparse.ArgumentError as err:
            raise ZooError(f"{config}: {short_parse_error(str(err))}") from err


def instantiate(config: Path, overrides: list[str], run_dir: Path):
    """(model, datamodule, trainer) a config builds, with the data hook applied; nothing runs."""
    cli = build_cli(["--config", str(config), *overrides], config, run_dir, run=False)
    return cli.model, cli.datamodule, cli.trainer
