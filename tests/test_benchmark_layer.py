"""benchmarks/moe_layer.py runs end to end and prints its ratio tables (a short setting)."""
import re
import subprocess
import sys
from pathlib import Path

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
