"""Expert-level parallelism on the CPU: experts run side by side, one intra-op thread each.

The experts of a sorted MoE layer are independent GEMM chains on disjoint rows. Run one after
another, each small GEMM is split across the intra-op (OpenMP) threads and pays a fork/join
barrier per op; at a few hundred rows per expert that scales badly (``benchmarks/moe_layer.py``,
1k tokens, d=256, h=1024, E=8, k=2, 2 threads, ten runs in session 5: the expert GEMMs alone
cost 1.15-1.24x the dense FFN's GEMMs run in order, 0.98-1.11x run side by side as here). Here
one thread per intra-op thread (the calling thread and pool workers) computes single-threaded,
and the experts are handed out longest first to whichever thread is free (:func:`run_groups`);
torch releases the GIL inside every op, so the threads really run at the same time.

Each expert is still computed by exactly one thread, so the result does not depend on how the
experts were grouped or scheduled. It matches the in-order run up to float rounding (a GEMM
split over two threads may round differently; ``tests/moe/test_threads.py``).

It is used only where it is safe and pays (:func:`expert_groups`): CPU tensors, more than one
intra-op thread, at least two experts with rows, enough rows and multiply-adds in all, groups
balanced well enough that the slowest one beats splitting each GEMM, and no dispatch or function mode active
(``FlopCounterMode``, fake tensors and tracing keep their thread-local state on the calling
thread, so they see every op only when everything runs there). ``ZOO_EXPERT_THREADS=0``
switches it off process-wide; ``experts.threaded = False`` per module.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

#: below this many sorted rows (all experts together) the thread hand-off costs more than it saves
MIN_ROWS = 256
#: nor below this many multiply-adds per forward (rows x weights per expert): each use of the
#: pool costs about 0.2 ms to start and 0.2 ms to join (measured), which small layers do not
#: earn back (d=64, h=256, 512 tokens: 5.6-5.9 ms threaded against 4.8-5.5 ms in order for the
#: forward); the layer benchmark's 1k-token layer does 1.07e9 and gains
MIN_WORK = 1 << 28
#: assumed speed-up of one GEMM split over n threads, as a fraction of n (not tuned: the 1k-token
#: layer's experts gained 1.2-1.6x from a second thread in this project's measurements, 0.6-0.8);
#: the groups are used when their slowest one is predicted faster than the split GEMMs
SPLIT_EFFICIENCY = 0.8

_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _forget_pool_in_child() -> None:
    # a forked child has none of the parent's threads (and maybe a lock held by one of them):
    # it starts its own pool on first use
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _start_worker(barrier: threading.Barrier) -> None:
    # MKL's and OpenMP's thread counts are per thread: this worker keeps 1 for good. (torch's own
    # count is process-wide; run_groups sets it to 1 around each use of the pool.)
    torch.get_num_threads()
    torch.set_num_threads(1)
    _local.worker = True
    barrier.wait()


def _executor(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` single-threaded workers, made once per process and thread count."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != n:
            old = _pool
            main = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="zoo-experts")
            barrier = threading.Barrier(n + 1)
            for _ in range(n):  # every submit finds no idle worker yet, so each starts a thread
                pool.submit(_start_worker, barrier)
            barrier.wait()
            # torch.set_num_threads(1) in the workers also set the count new threads start with
            torch.set_num_threads(main)
            _pool = (os.getpid(), n, pool)
            if old is not None and old[0] == os.getpid():
                old[2].shutdown(wait=False)
        return _pool[2]


def enabled() -> bool:
    return os.environ.get("ZOO_EXPERT_THREADS", "1") != "0"


def _safe_here(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or type(x) is not torch.Tensor or getattr(_local, "worker", False):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


def expert_groups(spans: list, x: torch.Tensor, allowed: bool = True, row_cost: int | None = None) -> list[list] | None:
    """Split ``spans`` (tuples ending in a row range ``lo, hi``) into one group per intra-op
    thread, or None when the experts should run one after another with multi-threaded GEMMs.
    ``row_cost``: multiply-adds per row (the weights of one expert), checked against MIN_WORK."""
    n = torch.get_num_threads()
    if not allowed or n < 2 or len(spans) < 2 or not enabled():
        return None
    total = sum(s[-1] - s[-2] for s in spans)
    if total < MIN_ROWS or (row_cost is not None and total * row_cost < MIN_WORK) or not _safe_here(x):
        return None
    n = min(n, len(spans))
    groups, loads = [[] for _ in range(n)], [0] * n
    for span in sorted(spans, key=lambda s: s[-2] - s[-1]):  # longest first, onto the lightest group
        i = loads.index(min(loads))
        groups[i].append(span)
        loads[i] += span[-1] - span[-2]
    if max(loads) > total / (n * SPLIT_EFFICIENCY):
        return None
    return groups


def _run_queue(fn, queue, lock, grad: bool, inference: bool) -> None:
    # grad and inference mode are per thread: take the caller's
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            fn(*item)


def run_groups(fn, groups: list[list]) -> None:
    """``fn(*span)`` for every span of every group, on one thread per group: the calling thread
    and ``len(groups) - 1`` pool workers. Returns once every span has run; the first error is
    raised after that.

    The groups fix the number of threads; the spans themselves are handed out longest first to
    whichever thread is free, so a thread whose core runs slower at the moment (another process,
    a noisy neighbour on a VM) takes fewer experts instead of holding the others up. Which thread
    runs an expert does not change its values: each expert is one single-threaded chain of ops.
    The calling thread takes part instead of only waiting, which saves one thread wake-up per use.

    torch's intra-op thread count is one process-wide number, read by every op on every thread,
    so it is 1 while the spans run (restored after): each thread computes single-threaded.
    Other threads of the process running torch ops at that moment also run single-threaded."""
    n = torch.get_num_threads()
    pool = _executor(len(groups) - 1) if len(groups) > 1 else None
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    queue = iter(sorted((s for g in groups for s in g), key=lambda s: s[-2] - s[-1]))
    lock = threading.Lock()
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(_run_queue, fn, queue, lock, grad, inference) for _ in groups[1:]] if pool else []
        try:
            _run_queue(fn, queue, lock, grad, inference)
        finally:
            wait(futures)  # after an error the others still run the rest: buffers stay valid
    finally:
        torch.set_num_threads(n)
    for f in futures:
        f.result()


def run_spans(fn, spans: list, x: torch.Tensor, allowed: bool = True, row_cost: int | None = None) -> None:
    """``fn(j, e, lo, hi)`` for every span j = (e, lo, hi), on the expert threads when that pays,
    else in order on this thread."""
    items = [(j, *s) for j, s in enumerate(spans)]
    groups = expert_groups(items, x, allowed, row_cost)
    if groups is None:
        for item in items:
            fn(*item)
    else:
        run_groups(fn, groups)
