"""The real `zoo` command in a subprocess, on the stock task's shipped configs kept tiny by overrides."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOE = ROOT / "configs/stock/moe.yaml"
DENSE = ROOT / "configs/stock/dense.yaml"
# real S&P 500 prices (skfolio ships them), a short window and few batches so each run takes seconds
TINY = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=3", "--trainer.limit_test_batches=4",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.window=10", "--data.init_args.days_per_batch=8"]


def zoo(*args, cwd):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_list_names_every_task_and_its_formats(tmp_path):
    rc, out = zoo("list", cwd=tmp_path)
    assert rc == 0, out
    for task in ("stock", "vad", "rl", "robust_cnn", "multitask_vit", "diffusion_policy"):
        if (ROOT / "configs" / task).is_dir():
            assert re.search(rf"^{task}$", out, re.M), out
    assert "configs/stock/moe.yaml" in out and "csv" in out.lower()


def test_flops_reports_total_active_and_flops(tmp_path):
    numbers = {}
    for cfg in (MOE, DENSE):
        rc, out = zoo("flops", cfg, *TINY, cwd=tmp_path)
        assert rc == 0, out
        grab = lambda key: int(re.search(rf"{key}:\s+([\d,]+)", out).group(1).replace(",", ""))  # noqa: E731
        numbers[cfg.stem] = {k: grab(k) for k in ("total params", "active params", "FLOPs / sample")}
    moe, dense = numbers["moe"], numbers["dense"]
    assert moe["active params"] < moe["total params"]
    assert dense["active params"] == dense["total params"]
    # the dense twin is matched to the MoE's active parameters
    assert abs(moe["active params"] - dense["active params"]) / dense["active params"] < 0.05
    assert moe["FLOPs / sample"] > 0 and dense["FLOPs / sample"] > 0


def read_test_metrics(run_dir: Path) -> dict:
    rows = list(csv.DictReader(open(run_dir / "test" / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}


def test_fit_resume_test_and_bad_checkpoint(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=2", "--run_dir", straight, cwd=tmp_path)
    assert rc == 0, out
    for f in ("metrics.csv", "config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (straight / f).is_file(), f
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=1", "--run_dir", resumed, cwd=tmp_path)
    assert rc == 0, out
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=2", "--run_dir", resumed,
                  "--ckpt_path", "last", cwd=tmp_path)
    assert rc == 0, out
    epochs = {row["epoch"] for row in csv.DictReader(open(resumed / "metrics.csv"))}
    assert {"0", "1"} <= epochs  # the resumed run appended to the first part's log
    for run in (straight, resumed):
        rc, out = zoo("test", "--config", MOE, *TINY, "--run_dir", run, "--ckpt_path", "last", cwd=tmp_path)
        assert rc == 0, out
        assert (run / "test" / "routing_load.png").stat().st_size > 5000
    a, b = read_test_metrics(straight), read_test_metrics(resumed)
    assert a and a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    # a checkpoint of the MoE model given to the dense config: one clear error, exit 2
    rc, out = zoo("test", "--config", DENSE, *TINY, "--run_dir", tmp_path / "x",
                  "--ckpt_path", straight / "checkpoints/last.ckpt", cwd=tmp_path)
    assert rc == 2 and "different model" in out and "Traceback" not in out, out


def test_user_errors_exit_2_with_one_message(tmp_path):
    rc, out = zoo("fit", "--config", tmp_path / "nope.yaml", cwd=tmp_path)
    assert rc == 2 and "config file not found" in out and "Traceback" not in out
    rc, out = zoo("fit", "--config", MOE, "--model.init_args.no_such_key=3", cwd=tmp_path)
    assert rc == 2 and "no_such_key" in out and "Traceback" not in out, out
    rc, out = zoo("fit", "--config", MOE, "--trainer.max_epochs=many", cwd=tmp_path)
    assert rc == 2 and "trainer.max_epochs" in out, out
    rc, out = zoo("test", "--config", MOE, "--run_dir", tmp_path / "empty", "--ckpt_path", "last", cwd=tmp_path)
    assert rc == 2 and "no checkpoint" in out, out
    rc, out = zoo("fit", "--config", MOE, "--data.init_args.root", tmp_path / "missing.csv", cwd=tmp_path)
    assert rc == 2 and "missing.csv" in out and "Namespace(" not in out and "Traceback" not in out, out
    rc, out = zoo("frobnicate", cwd=tmp_path)
    assert rc == 2 and "unknown command" in out


def test_compare_writes_table_csv_and_png(tmp_path):
    out_dir = tmp_path / "cmp"
    rc, out = zoo("compare", MOE, DENSE, "--seeds", 2, "--out", out_dir, *TINY, "--trainer.max_epochs=1",
                  cwd=tmp_path)
    assert rc == 0, out
    md = (out_dir / "compare.md").read_text()
    assert "| moe |" in md and "| dense |" in md and "±" in md
    for col in ("test/ic", "total_params", "active_params", "flops_per_sample", "train_time_s", "samples_per_s"):
        assert col in md, col
    rows = list(csv.DictReader(open(out_dir / "compare.csv")))
    assert sorted((r["config"], r["seed"]) for r in rows) == [("dense", "0"), ("dense", "1"), ("moe", "0"), ("moe", "1")]
    assert all(float(r["samples_per_s"]) > 0 and float(r["flops_per_sample"]) > 0 for r in rows)
    moe_rows = [r for r in rows if r["config"] == "moe"]
    assert float(moe_rows[0]["active_params"]) < float(moe_rows[0]["total_params"])
    assert (out_dir / "compare.png").stat().st_size > 10000
    assert (out_dir / "runs/moe/seed0/routing_load.png").is_file()
