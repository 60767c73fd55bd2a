"""multitask_vit results table: `zoo compare` over M3ViT, its dense twin and the single-task
dense baselines, then delta_m of each multi-task model against the single-task models.

    python benchmarks/multitask_vit_compare.py --seeds 3 --out runs/compare/multitask_vit [--key value ...]

Extra ``--key value`` pairs are passed to every config (e.g. ``--trainer.max_epochs 4``).
Writes, besides zoo compare's compare.md/csv/png, ``OUT/multitask_vit.md``: per-task metric
mean ± std over seeds, delta_m (per seed against the single-task means, then mean ± std),
total params, and MFLOPs per image of the all-task and the single-task (mean over tasks)
inference pathways (train time and throughput stay in zoo compare's own compare.md).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tasks.multitask_vit.metrics import TASK_METRIC, delta_m

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "multitask_vit"
MULTI = ["moe", "dense"]
MULTI_ALL = ["moe", "moe_task_embed", "moe_one_by_one", "dense"]  # table order of multi-task configs
SINGLE = [f"single_task_{t}" for t in TASK_METRIC]


def _fmt(vals) -> str:
    vals = np.asarray(vals, dtype=float)
    if vals.size == 0 or not np.isfinite(vals).any():
        return "-"
    m, s = float(np.nanmean(vals)), float(np.nanstd(vals))
    digits = 3 if abs(m) < 10 else 2
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def rows_from_runs(out_dirs: list[Path]) -> list[dict]:
    """Rows like compare.csv's, read from each run folder (OUT/runs/<config>/seed<k>/): the test
    metrics from metrics.csv, total params from the checkpoint's hyper-parameters. For runs split
    over several `zoo compare` calls, or a comparison cut short."""
    import torch

    from tasks.multitask_vit.module import MultiTaskViTModule

    rows = []
    for out in out_dirs:
        for run in sorted(Path(out).glob("runs/*/seed*")):
            metrics = list(csv.DictReader(open(run / "metrics.csv"))) if (run / "metrics.csv").exists() else []
            test = {k: v for r in metrics for k, v in r.items() if k.startswith("test/") and v != ""}
            ckpt = run / "checkpoints" / "last.ckpt"
            if not test or not ckpt.exists():
                continue
            hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
            module = MultiTaskViTModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
            rows.append({"config": run.parent.name, "seed": run.name[4:], **test,
                         "total_params": sum(p.numel() for p in module.model.parameters())})
    return rows


def tabulate(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    metrics = [m for m, _ in TASK_METRIC.values()]
    for r in rows:  # zoo compare's CSV columns are the logged names, test/<metric>
        r.update({m: r.get(f"test/{m}", "") for m in metrics})
    single_ref = {}
    for t, (m, _) in TASK_METRIC.items():
        vals = [float(r[m]) for r in by.get(f"single_task_{t}", []) if r.get(m)]
        if vals:
            single_ref[m] = float(np.mean(vals))
    header = ["model", *[f"{m} ({'↓' if low else '↑'})" for m, low in TASK_METRIC.values()], "Δm % (↑)",
              "total params", "MFLOPs all tasks", "MFLOPs single task"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    multi = [c for c in MULTI_ALL if c in by]
    for cfg in [*multi, *[s for s in SINGLE if s in by]]:
        runs = by.get(cfg, [])
        if not runs:
            continue
        cells = [f"{cfg} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"]
        for m in metrics:
            cells.append(_fmt([float(r[m]) for r in runs if r.get(m)]))
        have = [m for m in metrics if runs[0].get(m)]
        if cfg in multi and have and all(m in single_ref for m in have):
            dms = [delta_m({m: float(r[m]) for m in have}, {m: single_ref[m] for m in have}) for r in runs]
            cells.append(_fmt(dms))
        else:
            cells.append("-")
        cells.append(f"{float(runs[0]['total_params']) / 1e6:.3f}M")
        cells.append(_fmt([float(r["test/mflops_all_tasks"]) for r in runs]))
        cells.append(_fmt([float(r["test/mflops_single_task"]) for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/compare/multitask_vit"))
    ap.add_argument("--multi", nargs="+", default=MULTI, help="multi-task configs (names in configs/multitask_vit)")
    ap.add_argument("--table-only", action="store_true", help="only re-tabulate OUT/compare.csv")
    ap.add_argument("--from-runs", nargs="*", type=Path, default=None,
                    help="tabulate from the run folders of OUT and these other compare outputs "
                         "(implies --table-only)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared CPU more threads only spin)")
    args, overrides = ap.parse_known_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if not args.table_only and args.from_runs is None:
        from zoo.compare import compare
        configs = [CONFIGS / f"{c}.yaml" for c in [*args.multi, *SINGLE]]
        compare(configs, seeds=args.seeds, out=args.out, overrides=overrides)
    if args.from_runs is not None:
        rows = rows_from_runs([args.out, *args.from_runs])
    else:
        rows = list(csv.DictReader(open(args.out / "compare.csv")))
    text = tabulate(rows)
    if args.from_runs is not None:
        source = "run folders under " + ", ".join(str(p) for p in [args.out, *args.from_runs])
    else:
        source = (f"`python benchmarks/multitask_vit_compare.py --seeds {args.seeds} --out {args.out} "
                  + " ".join(overrides)).strip() + "`"
    header = ("# multitask_vit: M3ViT vs dense vs single-task (mean ± std over seeds)\n\n"
              f"Source: {source}\n\n")
    (args.out / "multitask_vit.md").write_text(header + text)
    print(header + text)


if __name__ == "__main__":
    main()
