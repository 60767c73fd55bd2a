"""The small ops inside the fused expert kernels (zoo/moe/fused.py), each against the alternative
it replaced, timed side by side in one run.

    python benchmarks/moe_ops.py [--rows 256] [--repeats 300] [--threads 1]

One expert block of the layer benchmark (``benchmarks/moe_layer.py``: d=256, h=1024, E=8, k=2;
at 1k tokens each expert gets about 256 rows), on one thread by default as the experts run
side by side (zoo.moe.threads). Every repetition runs all the variants in a fresh seeded random
order, and the table gives medians and the ratio new/old (below 1: the choice in fused.py is
faster). The combine rows use the whole layer's 2,048 assignments of 1,024 tokens.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F


def cases(rows: int, d: int = 256, h: int = 1024, tokens: int = 1024, k: int = 2) -> list[tuple]:
    """(what, old name, old fn, new name, new fn) for every op fused.py chose."""
    g = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(rows, d, generator=g), torch.randn(d, h, generator=g), torch.randn(h, generator=g)
    pre = torch.empty(rows, h)
    gp, ge = torch.randn(rows, h, generator=g), torch.randn(rows, d, generator=g)
    gb1, gb2, ones = torch.empty(h), torch.empty(d), torch.ones(rows)
    out, gate_grad = torch.randn(rows, d, generator=g), torch.empty(rows)
    rows_out = torch.randn(tokens * k, d, generator=g)
    unsort = torch.randperm(tokens * k, generator=g)
    slots = unsort.view(tokens, k)

    def gate_bmm():
        torch.bmm(ge.unsqueeze(1), out.unsqueeze(2), out=gate_grad.view(-1, 1, 1))
        return gate_grad

    def combine_sum():
        return rows_out.index_select(0, unsort).view(tokens, k, d).sum(1)

    def combine_adds():
        y = rows_out.index_select(0, slots[:, 0])
        for j in range(1, k):
            y.add_(rows_out.index_select(0, slots[:, j]))
        return y

    torch.testing.assert_close(combine_sum(), combine_adds())
    torch.testing.assert_close(torch.addmm(b1, x, w1), torch.mm(x, w1).add_(b1))
    torch.testing.assert_close(gp.sum(0), torch.mv(gp.t(), ones), rtol=1e-4, atol=1e-3)
    return [
        ("hidden layer + bias", "addmm", lambda: torch.addmm(b1, x, w1, out=pre),
         "mm, add_", lambda: torch.mm(x, w1, out=pre).add_(b1)),
        (f"bias grad [{rows}, {h}]", "sum(0)", lambda: torch.sum(gp, 0, out=gb1),
         "mv(g.t(), 1)", lambda: torch.mv(gp.t(), ones, out=gb1)),
        (f"bias grad [{rows}, {d}]", "sum(0)", lambda: torch.sum(ge, 0, out=gb2),
         "mv(g.t(), 1)", lambda: torch.mv(ge.t(), ones, out=gb2)),
        ("gate grad (row dots)", "bmm [r,1,d]@[r,d,1]", gate_bmm,
         "linalg.vecdot", lambda: torch.linalg.vecdot(ge, out, out=gate_grad)),
        (f"combine {tokens * k} rows", "gather, sum(1)", combine_sum, "k gathers, add_", combine_adds),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = cases(args.rows)
    fns = {(i, j): c[2 + 2 * j] for i, c in enumerate(table) for j in (0, 1)}
    times = {key: [] for key in fns}
    for f in fns.values():  # warm-up
        f()
    order = random.Random(0)
    for _ in range(args.repeats):
        for key in order.sample(list(fns), len(fns)):
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
    med = {key: sorted(v)[len(v) // 2] * 1e6 for key, v in times.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rows} rows per expert, "
          f"medians of {args.repeats} interleaved repetitions (us)")
    print(f"{'op':24} | {'old':20} {'us':>7} | {'new (fused.py)':20} {'us':>7} | new/old")
    for i, (what, old, _, new, _) in enumerate(table):
        a, b = med[(i, 0)], med[(i, 1)]
        print(f"{what:24} | {old:20} {a:7.0f} | {new:20} {b:7.0f} | {b / a:.2f}")


if __name__ == "__main__":
    main()
