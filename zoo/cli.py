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

import sys
from pathlib import Path

# one ZooError class for `python -m zoo.cli` (this file as __main__) and the modules importing zoo.cli
from zoo.errors import ZooError, short_parse_error

# torch and Lightning are imported by the commands that need them (zoo/lightning_cli.py):
# `zoo --help` answers at once instead of after ~10 s of imports. The layering is one-way:
# cli -> compare -> lightning_cli -> errors; nothing below imports this module.
SUBCOMMANDS = ("fit", "validate", "test", "predict")
REPO_ROOT = Path(__file__).resolve().parent.parent


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
    import torch

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
    from zoo.lightning_cli import build_cli

    cli = build_cli(args, config, run_dir, run=False, subcommand=sub)
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
    from zoo.lightning_cli import instantiate

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
    import torch

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
            msg = short_parse_error(msg)
        print(f"zoo: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
