"""Fixtures shared by the test modules."""
import os
import socket

import pytest
import torch

# zoo.cli imports Lightning only when a command needs it. Lightning's loggers bind the sys.stderr
# of the moment they are imported; import it here, before any test captures output, as a real
# `zoo` process does before it prints anything.
import zoo.lightning_cli  # noqa: F401,E402

# One intra-op thread for the whole session, and for the `zoo` subprocesses the tests start.
# The models here are tiny: a second thread gains little on an idle 2-core machine, and while
# anything else runs (the other rank of a DDP test, a resume subprocess, another user) OpenMP's
# waiting threads spin and a test runs up to 10x slower (measured, tests/moe's piecewise fit:
# 13 s alone and 118 s in a loaded full run with 2 threads, 8 s in a loaded full run with 1).
# Seeded runs gave identical values with 1 and 2 threads (vad, stock, robust_cnn learning tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_torch_globals():
    """Tests that call ``zoo.cli.main`` in-process: it sets the float32 matmul precision and they
    change the thread count; keep the rest of the session unaffected."""
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.set_num_threads(threads)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def free_ports():
    """``free_ports(n)``: n distinct free TCP ports, a MASTER_PORT for each 2-rank launch that runs
    beside another (left to itself, each launch's first rank picks its own)."""
    return _free_ports
