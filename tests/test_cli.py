"""The `zoo` command on the stock task's shipped configs kept tiny by overrides.

The cases call ``zoo.cli.main``, the function the ``zoo`` script and ``python -m zoo.cli`` exit
with (``sys.exit(main())``), in this process: its return value is the exit code and what it
prints is captured. A python start that imports torch and Lightning costs several seconds, so
the real command runs in a fresh process only for its exit codes (0 and 2), started when this
module starts so that it runs on the other core beside the in-process cases. More real processes:
the resumes of tests/test_resume.py and the bad-input cases of tests/test_bad_input.py.
"""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.cli import main

pytestmark = pytest.mark.usefixtures("restore_torch_globals")  # tests/conftest.py: main sets matmul precision
ROOT = Path(__file__).resolve().parent.parent
MOE = ROOT / "configs/stock/moe.yaml"
DENSE = ROOT / "configs/stock/dense.yaml"
# real S&P 500 prices (skfolio ships them), a short window and few batches so each run takes seconds
TINY = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=3", "--trainer.limit_test_batches=4",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.window=10", "--data.init_args.days_per_batch=8"]


@pytest.fixture(scope="module", autouse=True)
def real_processes(tmp_path_factory):
    """`python -m zoo.cli list` and a fit with a missing config, each in a fresh process."""
    d = tmp_path_factory.mktemp("cli_process")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "zoo.cli", *args], cwd=d, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in (("list", ["list"]), ("missing config", ["fit", "--config", str(d / "nope.yaml")]))}
    yield procs
    for proc in procs.values():  # not collected (test deselected): do not leave it running
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def zoo(capsys, monkeypatch, tmp_path):
    """``zoo(*args)`` -> (exit code, everything it printed), run from tmp_path (default run folders land there)."""
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])  # an uncaught exception here is the traceback a user would see
        cap = capsys.readouterr()
        return rc, cap.out + cap.err
    return run


def test_list_names_every_task_and_its_formats(zoo):
    rc, out = zoo("list")
    assert rc == 0, out
    for task in ("stock", "vad", "rl", "robust_cnn", "multitask_vit", "diffusion_policy"):
        if (ROOT / "configs" / task).is_dir():
            assert re.search(rf"^{task}$", out, re.M), out
    assert "configs/stock/moe.yaml" in out and "csv" in out.lower()


def test_flops_reports_total_active_and_flops(zoo):
    numbers = {}
    for cfg in (MOE, DENSE):
        rc, out = zoo("flops", cfg, *TINY)
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


def test_fit_resume_test_and_bad_checkpoint(zoo, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=2", "--run_dir", straight)
    assert rc == 0, out
    for f in ("metrics.csv", "config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (straight / f).is_file(), f
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=1", "--run_dir", resumed)
    assert rc == 0, out
    rc, out = zoo("fit", "--config", MOE, *TINY, "--trainer.max_epochs=2", "--run_dir", resumed, "--ckpt_path", "last")
    assert rc == 0, out
    epochs = {row["epoch"] for row in csv.DictReader(open(resumed / "metrics.csv"))}
    assert {"0", "1"} <= epochs  # the resumed run appended to the first part's log
    for run in (straight, resumed):
        rc, out = zoo("test", "--config", MOE, *TINY, "--run_dir", run, "--ckpt_path", "last")
        assert rc == 0, out
        assert (run / "test" / "routing_load.png").stat().st_size > 5000
    a, b = read_test_metrics(straight), read_test_metrics(resumed)
    assert a and a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    # a checkpoint of the MoE model given to the dense config: one clear error, exit 2
    rc, out = zoo("test", "--config", DENSE, *TINY, "--run_dir", tmp_path / "x",
                  "--ckpt_path", straight / "checkpoints/last.ckpt")
    assert rc == 2 and "different model" in out and "Traceback" not in out, out


def test_user_errors_exit_2_with_one_message(zoo, tmp_path):
    rc, out = zoo("fit", "--config", tmp_path / "nope.yaml")
    assert rc == 2 and "config file not found" in out and "Traceback" not in out
    rc, out = zoo("fit", "--config", MOE, "--model.init_args.no_such_key=3")
    assert rc == 2 and "no_such_key" in out and "Traceback" not in out, out
    rc, out = zoo("fit", "--config", MOE, "--trainer.max_epochs=many")
    assert rc == 2 and "trainer.max_epochs" in out, out
    rc, out = zoo("test", "--config", MOE, "--run_dir", tmp_path / "empty", "--ckpt_path", "last")
    assert rc == 2 and "no checkpoint" in out, out
    rc, out = zoo("fit", "--config", MOE, "--data.init_args.root", tmp_path / "missing.csv")
    assert rc == 2 and "missing.csv" in out and "Namespace(" not in out and "Traceback" not in out, out
    rc, out = zoo("frobnicate")
    assert rc == 2 and "unknown command" in out


def test_compare_writes_table_csv_and_png(zoo, tmp_path):
    out_dir = tmp_path / "cmp"
    rc, out = zoo("compare", MOE, DENSE, "--seeds", 2, "--out", out_dir, *TINY, "--trainer.max_epochs=1")
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


def test_real_process_exit_codes(real_processes):
    out, err = real_processes["list"].communicate(timeout=600)
    assert real_processes["list"].returncode == 0, out + err
    assert re.search(r"^stock$", out, re.M) and "configs/stock/moe.yaml" in out, out
    out, err = real_processes["missing config"].communicate(timeout=600)
    assert real_processes["missing config"].returncode == 2, out + err
    errors = [ln for ln in err.splitlines() if ln.startswith("zoo: error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert "config file not found" in errors[0] and "nope.yaml" in errors[0], err


def test_help_imports_neither_torch_nor_lightning():
    code = ("import sys; from zoo.cli import main; rc = main(['--help']); "
            "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "zoo fit|validate|test|predict" in out
    assert out.strip().splitlines()[-1] == "0 False False"
