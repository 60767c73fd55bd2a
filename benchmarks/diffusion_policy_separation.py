"""Where MoE and dense separate: the built-in "via" suite, MoDE vs dense twins, over seeds.

Eight tasks whose expert actions conflict at the same observation (reach the goal through
a via point on the task's side). Each config trains, picks its checkpoint by closed-loop
validation success (``checkpoints/best.ckpt``, ``val/success_rate``) and is tested by rollout
success over 10 episodes per task. Prints the mean ± std table and writes ``OUT/separation.md``,
``OUT/separation.csv`` and ``OUT/separation.png``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusion_policy_separation.py --seeds 3
    .venv/bin/python benchmarks/diffusion_policy_separation.py --seeds 1 --epochs 2   # smoke run
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import plots  # noqa: E402
from zoo.flops import describe  # noqa: E402
from zoo.lightning_cli import instantiate  # noqa: E402

CONFIGS = {
    "MoDE (noise routing)": "configs/diffusion_policy/via_moe.yaml",
    "MoDE (noise + goal routing)": "configs/diffusion_policy/via_moe_goal.yaml",
    "dense, = active params": "configs/diffusion_policy/via_dense.yaml",
    "dense, = total params": "configs/diffusion_policy/via_dense_total.yaml",
}


def run(config: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    args = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            *overrides, f"--seed_everything={seed}"]
    model, dm, trainer = instantiate(Path(config), args, run_dir=run_dir)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - t0
    best = run_dir / "checkpoints" / "best.ckpt"
    res = trainer.test(model, datamodule=dm, ckpt_path=str(best) if best.exists() else None,
                       weights_only=True, verbose=False)[0]
    costs = describe(model)
    return {"success": res["test/success_rate"], "action_mse": res["test/action_mse"],
            "params": costs["total_params"], "active_params": costs["active_params"], "train_s": train_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--out", default="runs/benchmarks/diffusion_policy_separation")
    p.add_argument("--only", nargs="*", type=int, help="run only these configs (0-3, in table order)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    overrides = [] if a.epochs is None else [f"--trainer.max_epochs={a.epochs}",
                                             f"--trainer.check_val_every_n_epoch={max(1, a.epochs // 3)}"]
    rows, table = [], {}
    for i, (label, cfg) in enumerate(CONFIGS.items()):
        if a.only and i not in a.only:
            continue
        runs = [run(cfg, s, out / "runs" / Path(cfg).stem / f"seed{s}", overrides) for s in range(a.seeds)]
        rows += [{"config": label, "seed": s, **r} for s, r in enumerate(runs)]
        succ = np.array([r["success"] for r in runs])
        mse = np.array([r["action_mse"] for r in runs])
        table[label] = {"success": (succ.mean(), succ.std()), "action MSE": (mse.mean(), mse.std()),
                        "params": runs[0]["params"], "active": runs[0]["active_params"],
                        "train s": float(np.mean([r["train_s"] for r in runs]))}
        print(f"{label:30s} success {succ.mean():.3f} ± {succ.std():.3f}  per seed {np.round(succ, 3).tolist()}  "
              f"action MSE {mse.mean():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "separation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"| config | success ({a.seeds} seeds) | action MSE | total params | active params | train s |",
             "|---|---|---|---|---|---|"]
    for label, t in table.items():
        lines.append(f"| {label} | {t['success'][0]:.3f} ± {t['success'][1]:.3f} | {t['action MSE'][0]:.3f} ± "
                     f"{t['action MSE'][1]:.3f} | {t['params']:,} | {t['active']:,} | {t['train s']:.0f} |")
    (out / "separation.md").write_text("\n".join(lines) + "\n")
    plots.compare_bars({k: {"success rate": v["success"]} for k, v in table.items()}, out / "separation.png",
                       title=f"via suite, rollout success over {a.seeds} seeds")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
