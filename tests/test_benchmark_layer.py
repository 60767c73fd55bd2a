"""benchmarks/moe_layer.py runs end to end and prints its ratio tables (a short setting)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_layer_benchmark_prints_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--tokens", "512",
                          "--repeats", "2", "--no-memory"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "forward+backward" in text and "inference (no grad)" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("512 |"))
    ratios = [float(r) for r in re.findall(r"\(([\d.]+)x\)", row)]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)  # moe, in order, loop, einsum vs dense
    floors = re.findall(r"([\d.]+)x, ([\d.]+)x$", row)
    assert floors and all(float(f) > 0 for f in floors[0])  # GEMMs alone: in order, side by side
    infer = [line.split("|") for line in text.split("inference (no grad)")[1].splitlines() if "|" in line][1:]
    assert [int(r[0]) for r in infer] == [1, 16, 256, 2048, 8192]
    assert all(float(r[-1]) > 0 for r in infer)


def test_ops_benchmark_compares_equal_ops_and_prints_ratios():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import moe_ops
    finally:
        sys.path.pop(0)
    for what, _, old, _, new in moe_ops.cases(rows=64):
        a = old().clone()
        torch.testing.assert_close(new().clone(), a, rtol=1e-4, atol=1e-3, msg=what)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_ops.py"), "--rows", "64", "--repeats", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = re.findall(r"\| (\d+\.\d\d)$", out.stdout, re.M)
    assert len(ratios) == 5 and all(float(r) > 0 for r in ratios)


def test_small_layer_benchmark_prints_every_arm():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_small.py"), "--sizes", "16x32x64",
                          "--skew", "0", "2", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith("16x32x64")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[2]) >= 1.0  # the padded path's rows over the real ones
        assert len(re.findall(r"\(([\d.]+)x\)", row)) == 3 and float(cells[-1]) > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_small.py"), "--sizes", "64x256"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DIMxHIDDENxTOKENS" in bad.stderr


def _task_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import task_speed
    finally:
        sys.path.pop(0)
    return task_speed


@pytest.mark.usefixtures("restore_torch_globals")
def test_task_speed_runs_one_task_end_to_end(tmp_path, capsys):
    """benchmarks/task_speed.py on the RL task with two timed steps: the CSV has the promised
    columns, one row, positive finite ratios that are the quotients of the timings."""
    import csv
    import math

    task_speed = _task_speed()
    out = tmp_path / "speed.csv"
    assert task_speed.main(["--tasks", "rl", "--repeats", "2", "--warmup", "1", "--threads", "1",
                            "--out", str(out)]) == 0
    with open(out) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["task", "moe_config", "dense_config", "active_flops_ratio", "train_ratio",
                                 "infer_ratio", "train_ms_moe", "train_ms_dense", "infer_ms_moe", "infer_ms_dense"]
    assert [r["task"] for r in rows] == ["rl"]
    r = {k: float(v) for k, v in rows[0].items() if k not in ("task", "moe_config", "dense_config")}
    assert all(math.isfinite(v) and v > 0 for v in r.values()), r
    assert r["train_ratio"] == pytest.approx(r["train_ms_moe"] / r["train_ms_dense"], rel=1e-6)
    assert r["infer_ratio"] == pytest.approx(r["infer_ms_moe"] / r["infer_ms_dense"], rel=1e-6)
    assert r["active_flops_ratio"] == pytest.approx(1.0, abs=0.05)  # PMOE's actor twin: equal active FLOPs
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| rl |")]
    assert len(table) == 1 and "`configs/rl/pmoe_sac.yaml`" in table[0]
    with pytest.raises(SystemExit) as bad:
        task_speed.main(["--tasks", "nope"])
    assert bad.value.code == 2 and "unknown ['nope']" in capsys.readouterr().err
