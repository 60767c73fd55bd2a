"""The ``zoo`` command.

    zoo fit|validate|test|predict --config FILE [--key value ...] [--run_dir DIR]
    zoo list
    zoo flops FILE [--key value ...]
    zoo compare A.yaml B.yaml [...] --seeds N --out DIR [--key value ...]

``fit``/``validate``/``test``/``predict`` are LightningCLI (subclass mode) with the zoo's
defaults: the run folder ``runs/<task>/<config-name>/`` (CSV logs, resolved config,
``checkpoints/last.ckpt`` and the best checkpoint by the module's ``monitor``), checkpoints
loaded with ``weights_only=True``. User errors print one line and exit with code 2; add
``--debug`` for the full traceback.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from zoo.module import ZooModule
from zoo.predict import PredictionWriter

SUBCOMMANDS = ("fit", "validate", "test", "predict")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ZooError(Exception):
    """A user error: printed as one line, exit code 2."""


def config_path(args: list[str]) -> Path | None:
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1])
    return None


def pop_option(args: list[str], name: str, default=None):
    """Remove ``--name value`` / ``--name=value`` from args and return the value."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return default


def default_run_dir(config: Path) -> Path:
    """runs/<task>/<config-name>: the task is the config's folder name (configs/<task>/x.yaml)."""
    return Path("runs") / config.resolve().parent.name / config.stem


def check_config(config: Path | None):
    if config is None:
        raise ZooError("no --config FILE given (e.g. zoo fit --config configs/vad/moe.yaml)")
    if not config.is_file():
        hint = ""
        tasks_dir = REPO_ROOT / "configs"
        if tasks_dir.is_dir():
            hint = "; known tasks: " + ", ".join(sorted(p.name for p in tasks_dir.iterdir() if p.is_dir()))
        raise ZooError(f"config file not found: {config}{hint}")


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


def build_cli(args: list[str], run: bool = True, run_dir: Path | None = None,
              subcommand: str | None = None) -> ZooCLI:
    """Build (and by default run) the LightningCLI for ``args``."""
    config = config_path(args)
    check_config(config)
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        try:
            return ZooCLI(ZooModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          save_config_kwargs={"overwrite": True}, args=args, run=run, run_dir=run_dir,
                          zoo_subcommand=subcommand, parser_kwargs={"exit_on_error": False},
                          load_from_checkpoint_support=False)
        except argparse.ArgumentError as err:
            raise ZooError(f"{config}: {_short_parse_error(str(err))}") from err


def _short_parse_error(msg: str) -> str:
    """jsonargparse's nested union report reduced to: the key, what was wrong, the value given."""
    lines = [ln.strip().lstrip("- ").strip() for ln in msg.splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Does not validate", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
                          "Given value type:")):
            continue
        if ln.startswith("Given value:") and len(ln) > 120:
            continue  # a dump of the whole namespace says nothing the other lines do not
        if ln.startswith("Parser key"):
            ln = ln.replace("Parser key", "key").rstrip(":")
        keep.append(ln.rstrip(":"))
    return "; ".join(dict.fromkeys(keep))[:600]


def instantiate(config: Path, overrides: list[str] = (), run_dir: Path | None = None):
    """(model, datamodule, trainer) a config builds, with the data hook applied; nothing runs."""
    args = ["--config", str(config), *overrides]
    cli = build_cli(args, run=False, run_dir=run_dir)
    return cli.model, cli.datamodule, cli.trainer


# ---------------------------------------------------------------------- subcommands
def resolve_ckpt(ckpt: str | None, run_dir: Path) -> str | None:
    """'last' -> the run folder's last.ckpt; a path must exist."""
    if ckpt is None or ckpt in ("null", "None"):
        return None
    if ckpt in ("last", "best"):
        path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
        if not path.is_file():
            raise ZooError(f"--ckpt_path {ckpt}: no checkpoint at {path} (has this config been fit "
                           f"with the same --run_dir?)")
        return str(path)
    if not Path(ckpt).is_file():
        raise ZooError(f"checkpoint not found: {ckpt}")
    return ckpt


def check_checkpoint(ckpt: str, model, config: Path):
    """A checkpoint must come from the model the config builds: same class, keys and shapes."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ZooError(f"cannot read checkpoint {ckpt} with weights_only=True: {err}") from err
    if "state_dict" not in state:
        raise ZooError(f"{ckpt} is not a Lightning checkpoint (no 'state_dict')")
    saved_cls = state.get("zoo_model_class") or (state.get("hyper_parameters") or {}).get("_class_path")
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if saved_cls and saved_cls != cls:
        raise ZooError(f"checkpoint {ckpt} holds a {saved_cls}, but {config} builds a {cls}")
    ours = model.state_dict()
    theirs = state["state_dict"]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shape = [k for k in ours if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        if shape:
            k = shape[0]
            parts.append(f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(ours[k].shape)}")
        raise ZooError(f"checkpoint {ckpt} was saved by a different model than {config} builds: "
                       + "; ".join(parts))


def cmd_lightning(sub: str, args: list[str]):
    run_dir = pop_option(args, "--run_dir")
    ckpt = pop_option(args, "--ckpt_path")
    weights_only = pop_option(args, "--weights_only", "true").lower() not in ("false", "0", "no")
    config = config_path(args)
    check_config(config)
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    cli = build_cli(args, run=False, run_dir=run_dir, subcommand=sub)
    ckpt = resolve_ckpt(ckpt, run_dir)
    if ckpt:
        check_checkpoint(ckpt, cli.model, config)
    getattr(cli.trainer, sub)(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=weights_only)


def cmd_list(args: list[str]):
    from zoo.registry import discover

    tasks = discover()
    if not tasks:
        print("no tasks found under", REPO_ROOT / "configs")
        return
    for t in tasks:
        print(f"{t['task']}")
        print(f"  configs: {', '.join(t['configs'])}")
        print(f"  data:    {t['data_class']}")
        for line in t["formats"].splitlines():
            print(f"           {line}")


def cmd_flops(args: list[str]):
    from zoo.flops import describe

    if not args or args[0].startswith("--"):
        raise ZooError("usage: zoo flops CONFIG.yaml [--key value ...]")
    config = Path(args[0])
    check_config(config)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = instantiate(config, args[1:], run_dir=Path(tmp))
        d = describe(model)
    print(f"config:            {config}")
    print(f"model:             {type(model).__name__}")
    print(f"total params:      {d['total_params']:,}")
    share = f"  ({d['active_params'] / d['total_params']:.1%} of total)" if d["total_params"] else ""
    print(f"active params:     {d['active_params']:,}{share}")
    print(f"FLOPs / sample:    {d['flops_per_sample']:,}")


def cmd_compare(args: list[str]):
    from zoo.compare import compare

    seeds = int(pop_option(args, "--seeds", 3))
    out = Path(pop_option(args, "--out", "runs/compare"))
    configs = []
    while args and not args[0].startswith("--"):
        configs.append(Path(args.pop(0)))
    if not configs:
        raise ZooError("usage: zoo compare A.yaml B.yaml [...] --seeds N --out DIR [--key value ...]")
    for c in configs:
        check_config(c)
    compare(configs, seeds=seeds, out=out, overrides=args)


HELP = __doc__


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    sub, rest = args[0], args[1:]
    torch.set_float32_matmul_precision("high")
    try:
        if sub in SUBCOMMANDS:
            cmd_lightning(sub, rest)
        elif sub == "list":
            cmd_list(rest)
        elif sub == "flops":
            cmd_flops(rest)
        elif sub == "compare":
            cmd_compare(rest)
        else:
            raise ZooError(f"unknown command {sub!r}; use one of {', '.join(SUBCOMMANDS + ('list', 'flops', 'compare'))}")
    except (ZooError, FileNotFoundError, ValueError, KeyError) as err:
        if debug:
            raise
        msg = str(err)
        if "Union subtypes" in msg:  # a datamodule/model constructor error wrapped by jsonargparse
            msg = _short_parse_error(msg)
        print(f"zoo: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
