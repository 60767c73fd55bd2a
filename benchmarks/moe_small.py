"""Training speed of small MoE layers (the sizes the tasks use) against their dense twin, and
the three ways zoo.moe can run the experts, side by side in one run.

    python benchmarks/moe_small.py [--sizes 32x128x256 64x256x512 ...] [--skew 0 1 2] [--repeats 60]

Each size is ``dim x hidden x tokens`` with E=8 experts, top-2, the Switch balance loss, and
forward+backward of ``y.pow(2).mean() + aux_loss``. The arms:
  fused    one autograd node over per-expert GEMMs (zoo/moe/fused.py), the default above
           ``BatchedExperts.pad_small_work`` multiply-adds
  slices   the same per-expert GEMMs as plain autograd ops (``experts.fused = False``)
  padded   one zero-padded ``bmm`` per expert layer (``experts.pad_limit = 100``): E x
           (busiest expert's rows) rows of work; the default below ``pad_small_work``
  dense    DenseFFN(dim, 2 * hidden), the same active FLOPs
``--skew s`` multiplies the router's first row by 1 + s, so expert 0 takes more tokens; the
"pad" column is the padded path's rows over the real assignments (E x max count / A).
Every repetition runs the arms in a fresh seeded random order; medians are reported.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zoo.moe import DenseFFN, MoE  # noqa: E402

E, K = 8, 2


def build(arm: str, dim: int, hidden: int, skew: float):
    if arm == "dense":
        torch.manual_seed(0)
        return DenseFFN(dim, K * hidden)
    torch.manual_seed(0)
    moe = MoE(dim, hidden, num_experts=E, k=K, balance="switch")
    with torch.no_grad():
        moe.router.gate.weight[0] *= 1 + skew
    moe.experts.pad_small_work = 0  # each arm takes its one path whatever the size
    if arm in ("slices", "padded"):
        moe.experts.fused = False
    if arm == "padded":
        moe.experts.pad_limit = 100.0
    return moe


def step(model, x):
    for p in model.parameters():
        p.grad = None
    y = model(x)
    loss = y.pow(2).mean()
    if isinstance(model, MoE):
        loss = loss + model.aux_loss
    loss.backward()


def measure(dim: int, hidden: int, tokens: int, skew: float, repeats: int) -> tuple[dict, float]:
    arms = {a: build(a, dim, hidden, skew) for a in ("fused", "slices", "padded", "dense")}
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        idx, _, _ = arms["fused"].router(x, None)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    waste = float(counts.max() * E / counts.sum())
    for m in arms.values():
        step(m, x)
    times = {a: [] for a in arms}
    order = random.Random(tokens)
    for _ in range(repeats):
        for a in order.sample(list(arms), len(arms)):
            t0 = time.perf_counter()
            step(arms[a], x)
            times[a].append(time.perf_counter() - t0)
    return {a: sorted(v)[len(v) // 2] for a, v in times.items()}, waste


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["32x128x256", "64x256x512", "64x256x2048",
                                                   "128x512x512", "128x512x2048"])
    ap.add_argument("--skew", type=float, nargs="+", default=[0.0])
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, E={E} k={K}, fwd+bwd, "
          f"medians of {args.repeats} interleaved repetitions (ms; ratio to dense)")
    print(f"{'dim x hidden x tokens':>22} | {'skew':>4} | {'pad':>4} | {'fused':>14} | {'slices':>14} | "
          f"{'padded':>14} | {'dense':>6} | padded/fused")
    for size in args.sizes:
        try:
            dim, hidden, tokens = (int(v) for v in size.lower().split("x"))
        except ValueError:
            ap.error(f"--sizes {size!r}: expected DIMxHIDDENxTOKENS, e.g. 64x256x512")
        for skew in args.skew:
            med, waste = measure(dim, hidden, tokens, skew, args.repeats)
            d = med["dense"]
            cell = lambda a: f"{med[a] * 1e3:6.2f} ({med[a] / d:.2f}x)"  # noqa: E731
            print(f"{size:>22} | {skew:4.1f} | {waste:4.2f} | {cell('fused'):>14} | {cell('slices'):>14} | "
                  f"{cell('padded'):>14} | {d * 1e3:6.2f} | {med['padded'] / med['fused']:.2f}")


if __name__ == "__main__":
    main()
