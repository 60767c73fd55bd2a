"""``zoo compare``: train and test each config over N seeds and tabulate MoE vs dense.

Writes ``OUT/compare.md`` (mean ± std of every ``test/*`` metric, total/active params,
FLOPs/sample, train wall time, inference samples/s), ``OUT/compare.csv`` (one row per run)
and ``OUT/compare.png`` (one panel per column, error bars over seeds). Each run keeps its logs,
checkpoints and routing PNGs under ``OUT/runs/<config>/seed<k>/``.
"""
from __future__ import annotations

import csv
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from zoo import plots
from zoo.flops import describe
from zoo.lightning_cli import instantiate

COST_COLUMNS = ["total_params", "active_params", "flops_per_sample", "train_time_s", "samples_per_s"]


def _labels(configs: list[Path]) -> list[str]:
    stems = [c.stem for c in configs]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{c.resolve().parent.name}/{c.stem}" for c in configs]


def run_one(config: Path, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    """Fit then test one config with one seed; returns its metrics and costs."""
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    args = [*quiet, *overrides, f"--seed_everything={seed}"]
    model, datamodule, trainer = instantiate(config, args, run_dir=run_dir)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_time = time.perf_counter() - t0
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items() if k.startswith("test/")}
    costs = describe(model)
    costs["train_time_s"] = train_time
    costs["samples_per_s"] = model.test_samples / model.test_step_time if model.test_step_time > 0 else float("nan")
    return {"metrics": metrics, "costs": costs, "run_dir": str(run_dir)}


def _fmt(mean: float, std: float | None = None) -> str:
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "nan"
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:.3g}M" if a < 1e9 else f"{v / 1e9:.3g}G"
        if a >= 100:
            return f"{v:.0f}"
        return f"{v:.4f}" if a < 1 else f"{v:.3f}"
    return one(mean) if std is None else f"{one(mean)} ± {one(std)}"


def summarise(results: dict[str, list[dict]]) -> tuple[dict, list[str]]:
    """{config: {column: (mean, std)}} and the metric names in a stable order."""
    metric_names = sorted({m for runs in results.values() for r in runs for m in r["metrics"]})
    table = {}
    for label, runs in results.items():
        row = {}
        for m in metric_names:
            vals = np.array([r["metrics"].get(m, np.nan) for r in runs], dtype=float)
            row[m] = (float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
                      float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan"))
        for c in COST_COLUMNS:
            vals = np.array([r["costs"][c] for r in runs], dtype=float)
            row[c] = (float(vals.mean()), float(vals.std()))
        table[label] = row
    return table, metric_names


def write_outputs(results: dict[str, list[dict]], out: Path, seeds: int, command: str,
                  plot: bool = True) -> dict:
    """compare.csv and compare.md (and, with ``plot``, compare.png) from the runs so far."""
    table, metric_names = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seed", *metric_names, *COST_COLUMNS, "run_dir"])
        for label, runs in results.items():
            for seed, r in enumerate(runs):
                w.writerow([label, seed, *[r["metrics"].get(m, "") for m in metric_names],
                            *[r["costs"][c] for c in COST_COLUMNS], r["run_dir"]])
    cols = metric_names + COST_COLUMNS
    lines = [f"# zoo compare ({seeds} seed{'s' if seeds != 1 else ''}, mean ± std)", "",
             f"Command: `{command}`", "",
             "| config | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, row in table.items():
        cells = []
        for c in cols:
            mean, std = row[c]
            if c in ("total_params", "active_params", "flops_per_sample"):
                cells.append(_fmt(mean))
            else:
                cells.append(_fmt(mean, std))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if plot:
        plot_table = {label: {c: row[c] for c in cols} for label, row in table.items()}
        plots.compare_bars(plot_table, out / "compare.png", title=f"zoo compare over {seeds} seeds")
    return table


def compare(configs: list[Path], seeds: int = 3, out: Path = Path("runs/compare"),
            overrides: list[str] = ()) -> dict:
    out = Path(out)
    labels = _labels(configs)
    results: dict[str, list[dict]] = defaultdict(list)
    runs = [(label, cfg, seed) for label, cfg in zip(labels, configs) for seed in range(seeds)]
    command = ("zoo compare " + " ".join(shlex.quote(str(c)) for c in configs) +
               f" --seeds {seeds} --out {out} " + " ".join(shlex.quote(o) for o in overrides)).strip()
    bar = tqdm(runs, desc="zoo compare", unit="run", file=sys.stderr)
    for label, cfg, seed in bar:
        bar.set_postfix_str(f"{label} seed {seed}")
        run_dir = out / "runs" / label.replace("/", "_") / f"seed{seed}"
        results[label].append(run_one(cfg, seed, run_dir, list(overrides)))
        # rewrite the tables after every run, so a crash or a stop later keeps what finished
        # (the PNG, which takes seconds to draw, only at the end)
        write_outputs(results, out, seeds, command, plot=False)
    table = write_outputs(results, out, seeds, command)
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}; "
          f"per-run logs and routing PNGs under {out / 'runs'}")
    return table
