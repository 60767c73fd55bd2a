"""Expert parallelism on this machine: the MoE layer on 1 process vs 2 gloo processes.

Both sides process the same global batch per step (2 x T tokens), forward + backward:
  - 1 process, all E experts local, ``torch.set_num_threads(2)`` (both cores);
  - 2 processes (gloo), E/2 experts each, 1 thread each, T tokens per rank, tokens exchanged
    by all-to-all (``zoo.moe.parallel``).
The all-to-all share is measured on the ranks by timing the same exchanges alone (counts, then
the token rows out and back, in the forward and again in the backward) with the sizes the
routing produced, and dividing by the step time.

    python benchmarks/expert_parallel.py [--tokens 4096] [--repeats 5]

Prints tokens/s side by side and the ratio; the README records a quiet-machine run.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo.moe import MoE

D, H, E, K = 256, 1024, 8, 2


def _step(moe, x):
    y = moe(x)
    y.float().pow(2).mean().backward()


def _time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def single(tokens: int, repeats: int) -> float:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    moe = MoE(D, H, num_experts=E, k=K, balance=None)
    x = torch.randn(2 * tokens, D)
    return _time(lambda: _step(moe, x), repeats)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tokens, repeats, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        moe = MoE(D, H, num_experts=E, k=K, balance=None, expert_parallel=True)
        x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(rank))

        def step():
            _step(moe, x)
            dist.barrier()

        t_step = _time(step, repeats)
        # the exchange alone, with the sizes this routing produced
        idx = moe.last_routing.expert_index
        dest = torch.div(idx, E // world, rounding_mode="floor")
        send = torch.bincount(dest, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        rows_out = torch.randn(sum(send_l), D)
        rows_in = torch.empty(sum(recv_l), D)

        def comm():
            for _ in range(2):  # forward, then the same two exchanges again in the backward
                c = torch.empty_like(send)
                dist.all_to_all_single(c, send)
                dist.all_to_all_single(rows_in, rows_out, recv_l, send_l)  # tokens out
                dist.all_to_all_single(rows_out, rows_in, send_l, recv_l)  # results back
            dist.barrier()

        t_comm = _time(comm, repeats)
        torch.save({"step": t_step, "comm": t_comm}, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def distributed(tokens: int, repeats: int, world: int = 2) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), tokens, repeats, out), nprocs=world, join=True)
        res = [torch.load(os.path.join(out, f"r{r}.pt"), weights_only=True) for r in range(world)]
    return max(r["step"] for r in res), max(r["comm"] for r in res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="tokens per rank")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"MoE d={D} h={H} E={E} k={K}, forward+backward, global batch = 2 x tokens per rank")
    print(f"{'tokens/rank':>11} | {'1 proc tok/s':>12} | {'2 gloo tok/s':>12} | {'2p / 1p':>7} | all-to-all share (2p)")
    for t in args.tokens:
        t1 = single(t, args.repeats)
        t2, comm = distributed(t, args.repeats)
        tok1, tok2 = 2 * t / t1, 2 * t / t2
        print(f"{t:>11} | {tok1:>12,.0f} | {tok2:>12,.0f} | {tok2 / tok1:>6.2f}x | {comm / t2:>5.1%}", flush=True)


if __name__ == "__main__":
    main()
