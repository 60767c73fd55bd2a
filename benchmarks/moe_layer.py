"""Speed and memory of the MoE layer against the alternatives, measured side by side.

    python benchmarks/moe_layer.py [--tokens 1024 8192 32768] [--repeats 5]

For d=256, h=1024, E=8, k=2 (dropless) it times forward+backward of
  moe     zoo.moe.MoE (sort tokens by expert, one GEMM per contiguous slice, gather back); on the
          CPU with 2+ threads its experts run side by side, one thread each (zoo.moe.threads)
  moe_seq the same layer with its experts one after another, each GEMM split over the threads
  dense   a DenseFFN with hidden = k*h, i.e. the same active FLOPs per token
  loop    the naive per-expert loop (boolean mask, gather, compute, scatter per expert)
  einsum  GShard-style one-hot dispatch/combine tensors [T, E, C] and einsums (capacity = k*T/E)
interleaving the methods in every repetition, in a fresh seeded random order each time (this
machine is noisy, and a step depends on what ran before it: a rotation of one fixed order would
keep every method behind the same neighbour), and reporting medians
and ratios to the dense FFN. Every step starts with the gradients set to None, as an optimizer's
``zero_grad()`` leaves them in training. A "GEMMs alone" column times only the matrix products of
both layers (forward and both backward products) for the token counts the router produced:
E GEMMs of ~k*T/E rows, one after another and side by side as the layer runs them, against
the dense FFN's one GEMM of T rows: the part of the gap that no dispatch code can remove.
Peak memory is the resident-set growth of one forward+backward in a fresh subprocess per
(method, T). Then inference alone (no grad) for 1..8192 tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from zoo.moe import DenseFFN, MoE  # noqa: E402
from zoo.moe.threads import run_spans  # noqa: E402

D, H, E, K = 256, 1024, 8, 2


class LoopMoE(nn.Module):
    """Reference implementation most codebases start from: a Python loop over experts."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        idx, w, _ = self.moe.router(x, None)  # [T, k]
        y = torch.zeros_like(x)
        ex = self.moe.experts
        for e in range(ex.num_experts):
            hit = idx == e  # [T, k]
            tok = hit.any(-1).nonzero(as_tuple=True)[0]
            if tok.numel() == 0:
                continue
            gate = (w * hit).sum(-1)[tok]
            y.index_add_(0, tok, ex.forward_expert(e, x[tok]) * gate[:, None])
        return y


class EinsumMoE(nn.Module):
    """GShard (Lepikhin et al. 2020) one-hot dispatch: dense [T, E, C] tensors and einsums."""

    def __init__(self, moe: MoE, capacity_factor: float = 1.0):
        super().__init__()
        self.moe, self.cf = moe, capacity_factor

    def forward(self, x):
        t = x.shape[0]
        idx, w, _ = self.moe.router(x, None)  # [T, k]
        cap = math.ceil(self.cf * t * K / E)
        onehot = F.one_hot(idx, E).to(x.dtype)  # [T, k, E]
        # position of each (token, choice) in its expert's buffer, first choices first
        flat = onehot.transpose(0, 1).reshape(-1, E)  # [k*T, E]
        pos = (flat.cumsum(0) - 1) * flat
        pos = pos.view(K, t, E).transpose(0, 1)  # [T, k, E]
        keep = onehot * (pos < cap)
        pos_oh = F.one_hot(pos.long().clamp(max=cap - 1), cap).to(x.dtype) * keep.unsqueeze(-1)  # [T, k, E, C]
        dispatch = pos_oh.sum(1)  # [T, E, C]
        combine = (pos_oh * w[:, :, None, None]).sum(1)  # [T, E, C]
        ex = self.moe.experts
        xin = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, d]
        out = ex.forward_batched(xin)  # [E, C, d]
        return torch.einsum("tec,ecd->td", combine, out)


def build(method: str):
    torch.manual_seed(0)
    moe = MoE(D, H, num_experts=E, k=K, balance=None)
    if method == "moe":
        return moe
    if method == "moe_seq":  # the same layer with its experts one after another (zoo.moe.threads off)
        moe.experts.threaded = False
        return moe
    if method == "dense":
        return DenseFFN(D, K * H)
    if method == "loop":
        return LoopMoE(moe)
    if method == "einsum":
        return EinsumMoE(moe)
    raise ValueError(method)


def einsum_bytes(t: int) -> int:
    cap = math.ceil(t * K / E)
    return t * K * E * cap * 4 * 3  # pos_oh, its weighted copy and grads, float32


def step(model, x):
    for p in model.parameters():
        p.grad = None
    x.grad = None
    y = model(x)
    y.float().pow(2).mean().backward()


def gemm_floor(t: int, repeats: int) -> float:
    """Median time of the MoE's expert GEMMs over that of the dense FFN's GEMMs, fwd+bwd.

    The expert row counts are those the benchmark's router assigns to ``t`` random tokens."""
    moe = build("moe")
    x = torch.randn(t, D)
    with torch.no_grad():
        idx, _, _ = moe.router(x, None)
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    a = sum(counts)
    xs, hs, gs = torch.randn(a, D), torch.randn(a, H), torch.randn(a, D)
    w1, w2 = torch.randn(E, D, H), torch.randn(E, H, D)
    xd, hd, gd = torch.randn(t, D), torch.randn(t, K * H), torch.randn(t, D)
    wd1, wd2 = torch.randn(D, K * H), torch.randn(K * H, D)

    def six(x_, h_, g_, a_, b_):  # forward x a, h b; backward g b^T, h^T g, then c a^T, x^T c
        c = g_ @ b_.t()
        x_ @ a_, h_ @ b_, h_.t() @ g_, c @ a_.t(), x_.t() @ c

    parts = list(zip(xs.split(counts), hs.split(counts), gs.split(counts)))
    spans, lo = [], 0
    for e, c in enumerate(counts):
        if c:
            spans.append((e, lo, lo + c))
        lo += c

    def one(j, e, lo, hi):
        six(*parts[e], w1[e], w2[e])

    def experts():
        for e, _, _ in spans:
            one(0, e, 0, 0)

    def experts_side_by_side():  # the grouping the MoE layer uses (zoo.moe.threads)
        run_spans(one, spans, xs)

    def dense():
        six(xd, hd, gd, wd1, wd2)

    experts(), experts_side_by_side(), dense()
    te, tp, td = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); experts(); te.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); experts_side_by_side(); tp.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); dense(); td.append(time.perf_counter() - t0)  # noqa: E702
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(te) / med(td), med(tp) / med(td)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(method: str, t: int) -> None:
    """Peak resident-set growth (MiB) of one forward+backward, printed as JSON.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs`` 5), so the peak is
    this step's, not the import's."""
    model = build(method)
    x = torch.randn(t, D, requires_grad=True)
    step(model, torch.randn(64, D, requires_grad=True))  # warm up allocator and kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step(model, x)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def peak_memory(method: str, t: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(t)], capture_output=True, text=True)
    if out.returncode:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--einsum-max-gib", type=float, default=6.0,
                    help="skip the one-hot einsum baseline when its dispatch tensors exceed this")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, d={D} h={H} E={E} k={K}, dropless")
    from tqdm import tqdm

    rows = []
    for t in args.tokens:
        methods = ["moe", "moe_seq", "dense", "loop"]
        if einsum_bytes(t) / 2**30 <= args.einsum_max_gib:
            methods.append("einsum")
        models = {m: build(m) for m in methods}
        x = torch.randn(t, D, requires_grad=True)
        for m in methods:  # warm-up
            step(models[m], x)
        times = {m: [] for m in methods}
        order = random.Random(t)
        for _ in tqdm(range(args.repeats), desc=f"T={t}", leave=False):
            # a new random order every repetition, so each method follows each other one about
            # equally often (a step right after the einsum's large one-hot buffers runs on a
            # colder cache; rotating one fixed order would put the same method there every time)
            for m in order.sample(methods, len(methods)):
                t0 = time.perf_counter()
                step(models[m], x)
                times[m].append(time.perf_counter() - t0)
        med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
        mem = {m: (float("nan") if args.no_memory else peak_memory(m, t)) for m in methods}
        rows.append((t, med, mem, gemm_floor(t, args.repeats)))

    print("\nforward+backward, median seconds (ratio to dense FFN of equal active FLOPs)")
    print(f"{'T':>6} | {'moe':>16} | {'moe in order':>16} | {'dense':>8} | {'loop':>16} | {'einsum':>16} "
          "| moe/loop | moe/einsum | GEMMs alone: in order, side by side")
    for t, med, _, floor in rows:
        d = med["dense"]
        cell = lambda m: f"{med[m]:.4f} ({med[m] / d:.2f}x)" if m in med else "skipped (memory)"  # noqa: E731
        ein = f"{med['moe'] / med['einsum']:.2f}" if "einsum" in med else "-"
        print(f"{t:>6} | {cell('moe'):>16} | {cell('moe_seq'):>16} | {d:>8.4f} | {cell('loop'):>16} | "
              f"{cell('einsum'):>16} | "
              f"{med['moe'] / med['loop']:.2f}     | {ein:>10} | {floor[0]:.2f}x, {floor[1]:.2f}x")
    if not args.no_memory:
        print("\npeak memory of one forward+backward, MiB (ratio to dense)")
        for t, _, mem, _ in rows:
            d = mem["dense"]
            cells = " | ".join(f"{m} {v:.0f} ({v / d:.2f}x)" for m, v in mem.items())
            print(f"{t:>6} | {cells}")

    print("\ninference (no grad), median ms: MoE vs dense FFN of equal active FLOPs")
    moe, dense = build("moe").eval(), build("dense").eval()
    print(f"{'T':>6} | {'moe ms':>8} | {'dense ms':>8} | ratio")
    with torch.no_grad():
        for t in (1, 16, 256, 2048, 8192):
            x = torch.randn(t, D)
            moe(x), dense(x)
            tm, td = [], []
            for _ in range(max(args.repeats, 5)):
                t0 = time.perf_counter(); moe(x); tm.append(time.perf_counter() - t0)  # noqa: E702
                t0 = time.perf_counter(); dense(x); td.append(time.perf_counter() - t0)  # noqa: E702
            a, b = sorted(tm)[len(tm) // 2] * 1e3, sorted(td)[len(td) // 2] * 1e3
            print(f"{t:>6} | {a:8.3f} | {b:8.3f} | {a / b:.2f}")


if __name__ == "__main__":
    main()
