"""The field's demonstration formats end to end: write, train ``configs/diffusion_policy/moe.yaml``, test.

Writes the built-in reach + path demos (50 episodes per task, every third episode cut to 4
steps, shorter than the 10-step chunk) as a robomimic low-dim HDF5 file, a Diffusion Policy
zarr replay buffer and a LeRobot v2 folder (with ``tests/docs_examples/diffusion_policy.py``'s
writers: h5py, zarr, pyarrow), then trains and tests the MoE config on each (no environment:
held-out action MSE) and prints it beside the MSE of predicting the training mean action.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusion_policy_formats.py
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.diffusion_policy.data import generate_demonstrations  # noqa: E402
from zoo.lightning_cli import instantiate  # noqa: E402


def writers():
    spec = importlib.util.spec_from_file_location("dp_examples", ROOT / "tests/docs_examples/diffusion_policy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes_per_task", type=int, default=50)
    p.add_argument("--out", default="runs/benchmarks/diffusion_policy_formats")
    p.add_argument("overrides", nargs="*", help="extra CLI overrides, e.g. --trainer.max_epochs=1")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out, ex = Path(a.out), writers()
    demos = ex.shorten(generate_demonstrations(["reach", "path"], a.episodes_per_task, seed=7))
    files = {"robomimic HDF5": ex.write_robomimic(out / "data" / "demos.hdf5", demos),
             "zarr replay buffer": ex.write_zarr(out / "data" / "replay.zarr", demos),
             "LeRobot v2 folder": ex.write_lerobot(out / "data" / "lerobot", demos)}
    lines = ["| format | episodes (short) | action MSE | mean-action MSE | ratio |", "|---|---|---|---|---|"]
    lengths = np.diff(np.concatenate([[0], demos["episode_ends"]]))
    for label, path in files.items():
        args = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--data.init_args.root={path}", *a.overrides]
        model, dm, trainer = instantiate(ROOT / "configs/diffusion_policy/moe.yaml", args,
                                         run_dir=out / "runs" / path.stem)
        trainer.fit(model, datamodule=dm)
        res = trainer.test(model, datamodule=dm, verbose=False)[0]
        mse, base = res["test/action_mse"], res["test/mean_action_mse"]
        lines.append(f"| {label} | {len(lengths)} ({int((lengths < 10).sum())} < 10 steps) | {mse:.3f} | "
                     f"{base:.3f} | {mse / base:.2f} |")
        print(lines[-1], flush=True)
    (out / "formats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
