"""Learning-curve PNGs (mean +- std over seeds) from `zoo compare` run folders of the RL task.

Every RL run writes ``learning_curve.csv`` (env steps, mean deterministic evaluation return)
into its run folder; ``zoo compare ... --out DIR`` keeps runs under ``DIR/runs/<config>/seed<k>/``.
This script gathers the configs of all given compare folders into one figure (mean with a
shaded +-1 std band per config) and prints a markdown table of the last evaluation point and
the curve AUC per config.

    python benchmarks/rl_curves.py runs/compare/rl_pmoe_sac runs/compare/rl_sac \
        --out runs/compare/rl_sac_curves.png --title "PMOE-SAC vs SAC, Pendulum-v1"
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tasks.rl.metrics import curve_auc, plot_learning_curves


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"env_steps", "return_mean"}:
        raise ValueError(f"{path}: expected columns env_steps,return_mean")
    return (np.array([float(r["env_steps"]) for r in rows]), np.array([float(r["return_mean"]) for r in rows]))


def gather(compare_dir: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    runs_dir = compare_dir / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir} does not exist (run `zoo compare ... --out {compare_dir}` first)")
    curves = {}
    for cfg_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        files = sorted(cfg_dir.glob("seed*/learning_curve.csv"))
        if files:
            curves[cfg_dir.name] = [read_curve(f) for f in files]
    if not curves:
        raise FileNotFoundError(f"no learning_curve.csv under {runs_dir}")
    return curves


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compare_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="evaluation return, mean ± std over seeds")
    args = parser.parse_args(argv)
    curves = {}
    for d in args.compare_dirs:
        curves.update(gather(d))
    print("| config | seeds | env steps | last eval return | curve AUC |")
    print("|---|---|---|---|---|")
    for name, runs in curves.items():
        last = np.array([r[1][-1] for r in runs])
        auc = np.array([curve_auc(*r) for r in runs])
        print(f"| {name} | {len(runs)} | {int(runs[0][0][-1])} | {last.mean():.1f} ± {last.std():.1f} | "
              f"{auc.mean():.1f} ± {auc.std():.1f} |")
    plot_learning_curves(curves, args.out, title=args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
