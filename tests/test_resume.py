"""Resume exactness through the real ``zoo fit`` (issue 11, item 4).

For each task, on its shipped config kept tiny by CLI overrides:

- straight: ``zoo fit --trainer.max_epochs 2``, uninterrupted;
- interrupted: the same command, stopped after its first epoch (an ``EarlyStopping`` callback
  added on the command line whose divergence threshold every finite loss crosses), then
  ``zoo fit ... --trainer.max_epochs 2 --ckpt_path last`` in a fresh process.

The final weights (and the EMA weights where the task keeps them) must be bitwise equal and the
last epoch's validation metrics identical. The first part is stopped rather than run with
``--trainer.max_epochs 1`` because several tasks size their learning-rate schedule by
``max_epochs`` (robust_cnn's cosine over epochs, diffusion_policy's warm-up + cosine over
``estimated_stepping_batches``, multitask_vit's warm-up): a 1-epoch run is a different run, not
an interrupted one. Final weights are read from the run folder's ``last.ckpt`` (rewritten every
epoch, whatever the monitored metric did).

The straight runs and the first parts run in this process through ``zoo.cli.main`` (one
Lightning import); the resumes run as ``python -m zoo.cli`` subprocesses, each started as soon
as its first part has finished, so it runs beside the next task's in-process runs. Every run
uses one intra-op thread so the in-process and subprocess runs sum in the same order.

rl tests its own resume (replay buffer and environment state) in tests/tasks/test_rl.py.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.cli import main

pytestmark = pytest.mark.usefixtures("restore_torch_globals")  # tests/conftest.py
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
COMMON = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--trainer.log_every_n_steps=1", "--trainer.check_val_every_n_epoch=1", "--trainer.max_epochs=2"]
TASKS = {
    # synthetic regime/style panel (the S&P 500 panel costs seconds to build and adds nothing here)
    "stock": (CONFIGS / "stock/moe.yaml", [
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--data.init_args.window=5",
        "--data.init_args.days_per_batch=4", "--data.init_args.source=synthetic",
        "--data.init_args.synthetic={num_days: 120, num_stocks: 12}"]),
    # AdvMoE: two optimizers, TRADES training attacks and PGD validation, both from random starts
    "robust_cnn": (CONFIGS / "robust_cnn/moe_advmoe.yaml", [
        "--data.init_args.dataset=digits", "--data.init_args.builtin_size=null", "--data.init_args.max_train=96",
        "--data.init_args.max_eval=32", "--data.init_args.batch_size=32", "--model.init_args.width=4",
        "--model.init_args.val_steps=1"]),
    # noisy multi-gate top-k routing, warm-up schedule
    "multitask_vit": (CONFIGS / "multitask_vit/moe.yaml", [
        "--data.init_args.num_train=32", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
        "--data.init_args.batch_size=8", "--data.init_args.img_size=16", "--model.init_args.img_size=16",
        "--model.init_args.dim=16", "--model.init_args.depth=2", "--model.init_args.num_heads=2",
        "--model.init_args.num_experts=4", "--model.init_args.task_dim=4", "--model.init_args.decoder_channels=4"]),
    # sampled top-k routing, EDM noise levels, EMA weights, step-wise warm-up + cosine schedule
    "diffusion_policy": (CONFIGS / "diffusion_policy/moe.yaml", [
        "--data.init_args.episodes_per_task=4", "--data.init_args.eval_episodes=0", "--data.init_args.batch_size=32",
        "--trainer.limit_train_batches=3", "--model.init_args.dim=16", "--model.init_args.expert_hidden=32",
        "--model.init_args.depth=1", "--model.init_args.num_sampling_steps=2"]),
    # staged GS-MoE (encoder, then class experts), balanced normal/anomalous batches
    "vad": (CONFIGS / "vad/moe.yaml", [
        "--model.init_args.stages={encoder: 1, experts: 1}", "--data.init_args.num_train_normal=8",
        "--data.init_args.num_train_anomalous=8", "--data.init_args.num_test_normal=4",
        "--data.init_args.num_test_anomalous=4", "--data.init_args.batch_size=4", "--data.init_args.min_len=16",
        "--data.init_args.max_len=16", "--data.init_args.num_segments=16", "--data.init_args.feature_dim=16",
        "--model.init_args.dim=16", "--model.init_args.expert_hidden=16"]),
}
STOP_AFTER_FIRST_EPOCH = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.monitor=train/aux_loss",
    "--trainer.callbacks.divergence_threshold=-1e30", "--trainer.callbacks.check_on_train_epoch_end=true"]


def fit_args(task: str, run: Path) -> list[str]:
    config, overrides = TASKS[task]
    return ["fit", "--config", str(config), *COMMON, *overrides, "--run_dir", str(run)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    errors: dict[str, str] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task in TASKS:
            for run, extra in ((base / task / "straight", []), (base / task / "resumed", STOP_AFTER_FIRST_EPOCH)):
                rc = main(fit_args(task, run) + extra)
                if rc != 0:
                    errors[task] = f"{run.name} run exited {rc}"
            if task not in errors:  # its resume runs on the other core while the next task's runs go on here
                procs[task] = subprocess.Popen([sys.executable, "-m", "zoo.cli",
                                                *fit_args(task, base / task / "resumed"), "--ckpt_path", "last"],
                                               cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True)
    finally:
        torch.set_num_threads(threads)
        for task, proc in procs.items():
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                errors[task] = f"resume exited {proc.returncode}: {out[-3000:]}"
    return base, errors


def last_epoch_val(run: Path) -> dict[str, str]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    last = max(int(r["epoch"]) for r in rows if r.get("epoch"))
    return {k: v for r in rows if r.get("epoch") == str(last) for k, v in r.items() if k.startswith("val/") and v}


@pytest.mark.parametrize("task", list(TASKS))
def test_interrupted_and_resumed_fit_equals_uninterrupted(runs, task):
    base, errors = runs
    assert task not in errors, errors[task]
    straight, resumed = base / task / "straight", base / task / "resumed"
    # the first part really stopped after one epoch, and the resume appended the second
    assert {r["epoch"] for r in csv.DictReader(open(resumed / "metrics.csv")) if r["epoch"]} == {"0", "1"}
    a = torch.load(straight / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) and a["epoch"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{task}: weights differ after resuming: {differ[:5]}"
    if "ema_state" in a:  # diffusion_policy's EMA weights
        assert all(torch.equal(a["ema_state"][k], b["ema_state"][k]) for k in a["ema_state"])
    va, vb = last_epoch_val(straight), last_epoch_val(resumed)
    assert va and va == vb, f"{task}: last-epoch validation metrics differ: {va} vs {vb}"
