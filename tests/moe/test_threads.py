"""Experts side by side on the CPU threads (zoo.moe.threads): same values, same gradients,
errors and thread counts handled, and off wherever it would be wrong or pointless."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo.moe.threads as threads
from zoo.moe import MoE
from zoo.moe.experts import BatchedExperts


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads, and the work threshold off: these layers are small so the tests are
    fast, and would otherwise (rightly) run their experts in order."""
    monkeypatch.setattr(threads, "MIN_WORK", 0)
    monkeypatch.setattr(BatchedExperts, "pad_small_work", 0)  # nor pad, should that become the default
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Counts the real thread-pool runs (the real function still runs)."""
    calls = []
    real = threads.run_groups

    def counted(fn, groups):
        calls.append([len(g) for g in groups])
        return real(fn, groups)

    monkeypatch.setattr(threads, "run_groups", counted)
    return calls


def _step(moe, x):
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = moe(x)
    (y.square().sum() + moe.aux_loss).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_threaded_equals_in_order(two_threads, spy, expert):
    torch.manual_seed(0)
    moe = MoE(32, 64, num_experts=6, k=2, expert=expert)
    x = torch.randn(500, 32) * 3  # uneven routing, every expert used
    moe.experts.threaded = False
    y0, gx0, g0 = _step(moe, x)
    assert spy == []
    moe.experts.threaded = True
    y1, gx1, g1 = _step(moe, x)
    assert len(spy) == 2 and all(len(g) == 2 for g in spy)  # forward and backward, two groups
    assert sum(spy[0]) == 6
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)
    y2, gx2, g2 = _step(moe, x)  # the same grouping twice: bit for bit
    assert torch.equal(y2, y1) and torch.equal(gx2, gx1)
    assert all(torch.equal(g2[n], g1[n]) for n in g1)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kw", [
    dict(router="switch", k=1),
    dict(router="expert_choice"),
    dict(capacity_factor=1.0),  # dropping: the combine is an index_add, no unsort
    dict(null_experts=2),
    dict(shared_experts=1, activation="relu"),
    dict(router="dense_to_sparse", k=1),
], ids=["switch", "expert_choice", "capacity", "null", "shared_relu", "dense_to_sparse"])
def test_threaded_equals_in_order_every_routing(two_threads, spy, kw):
    torch.manual_seed(4)
    moe = MoE(32, 64, num_experts=4, **{"k": 2, **kw})
    x = torch.randn(600, 32) * 2
    start = {k: v.clone() for k, v in moe.state_dict().items()}  # the annealing step counter too
    moe.experts.threaded = False
    torch.manual_seed(5)
    y0, gx0, g0 = _step(moe, x)
    moe.load_state_dict(start)
    moe.experts.threaded = True
    torch.manual_seed(5)  # random routers draw the same numbers
    y1, gx1, g1 = _step(moe, x)
    assert spy, "the experts never ran side by side"
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)


def test_inference_threaded_equals_in_order(two_threads, spy):
    torch.manual_seed(1)
    moe = MoE(32, 64, num_experts=4, k=2).eval()
    x = torch.randn(400, 32)
    with torch.no_grad():
        moe.experts.threaded = False
        y0 = moe(x)
        moe.experts.threaded = True
        y1 = moe(x)
    with torch.inference_mode():
        y2 = moe(x)
    assert len(spy) == 2
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    assert torch.equal(y2, y1)


def test_groups_balance_rows_and_refuse_skew(two_threads, monkeypatch):
    x = torch.zeros(1, 4)
    spans = [(0, 0, 300), (1, 300, 400), (2, 400, 600), (3, 600, 800)]
    groups = threads.expert_groups(spans, x)
    loads = sorted(sum(hi - lo for _, lo, hi in g) for g in groups)
    assert loads == [400, 400]  # longest first: {300, 100} and {200, 200}
    assert sorted(s for g in groups for s in g) == spans
    skewed = [(0, 0, 900), (1, 900, 1000)]  # one expert holds 90 % of the rows
    assert threads.expert_groups(skewed, x) is None
    assert threads.expert_groups([(0, 0, 50), (1, 50, 100)], x) is None  # too few rows
    assert threads.expert_groups(spans, x, allowed=False) is None
    monkeypatch.setattr(threads, "MIN_WORK", 1 << 28)
    assert threads.expert_groups(spans, x, row_cost=64 * 256 * 2) is None  # 26M multiply-adds: small
    assert threads.expert_groups(spans, x, row_cost=256 * 1024 * 2) is not None  # 419M
    torch.set_num_threads(1)
    assert threads.expert_groups(spans, x) is None


def test_off_under_flop_counter_and_env(two_threads, spy, monkeypatch):
    torch.manual_seed(2)
    moe = MoE(32, 64, num_experts=4, k=2)
    x = torch.randn(400, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        moe(x).sum().backward()
    assert spy == []  # the counter sees the calling thread only: everything must run there
    moe.experts.threaded = False
    with FlopCounterMode(display=False) as reference:
        moe(x).sum().backward()
    assert counter.get_total_flops() == reference.get_total_flops() > 0
    moe.experts.threaded = True
    monkeypatch.setenv("ZOO_EXPERT_THREADS", "0")
    moe(x).sum().backward()
    assert spy == []


def test_error_in_a_group_is_raised_after_all_finish(two_threads):
    finished = []

    def fn(j, e, lo, hi):
        if e == 1:
            raise ValueError("expert 1 failed")
        finished.append(e)

    with pytest.raises(ValueError, match="expert 1 failed"):
        threads.run_groups(fn, [[(0, 1, 0, 10)], [(1, 0, 10, 400), (2, 2, 400, 800)]])
    assert sorted(finished) == [0, 2]  # the other experts still ran
    assert torch.get_num_threads() == 2  # restored


def test_a_slower_thread_takes_fewer_experts(two_threads):
    """Experts go to whichever thread is free: here the calling thread is made slow (sleeps
    release the GIL, as torch ops do), so the pool worker runs the rest while it is busy."""
    import threading
    import time

    ran = []

    def fn(j, e, lo, hi):
        main = threading.current_thread() is threading.main_thread()
        ran.append((e, main))
        time.sleep(0.3 if main else 0.01)

    spans = [(j, j, 10 * j, 10 * j + 10 - j) for j in range(6)]  # 10, 9, ..., 5 rows
    threads.run_groups(fn, [spans[:3], spans[3:]])
    assert sorted(e for e, _ in ran) == list(range(6))  # each expert exactly once
    assert sum(main for _, main in ran) == 1  # the slow thread took one, the worker five
    assert ran[0][0] == 0 or ran[1][0] == 0  # handed out longest first


def test_forked_child_runs_its_own_pool(two_threads):
    import multiprocessing as mp

    threads.run_groups(lambda *a: None, [[(0, 0, 0, 1)], [(1, 1, 1, 2)]])  # the parent's pool exists
    parent = threads._pool
    with mp.get_context("fork").Pool(1) as pool:
        child_pid, names = pool.apply(_child_groups)
    assert child_pid != parent[0]
    # the calling thread takes one expert, a worker of the child's own pool the other
    assert sorted(names) == ["MainThread", "zoo-experts_0"]


def _child_groups():
    # only the pool is exercised: GNU OpenMP itself cannot run multi-threaded ops in a forked child
    import os
    import threading

    names = []
    threads.run_groups(lambda *a: (names.append(threading.current_thread().name), __import__("time").sleep(0.05)),
                       [[(0, 0, 0, 1)], [(1, 1, 1, 2)]])
    assert threads._pool[0] == os.getpid()
    return os.getpid(), names


def test_small_layers_run_in_order(spy):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        moe = MoE(32, 64, num_experts=4, k=2)
        moe(torch.randn(2000, 32)).sum().backward()  # 4000 rows x 4096 weights: 16M < MIN_WORK
    finally:
        torch.set_num_threads(n)
    assert spy == []
