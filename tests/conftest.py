"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def restore_torch_globals():
    """Tests that call ``zoo.cli.main`` in-process: it sets the float32 matmul precision and they
    change the thread count; keep the rest of the session unaffected."""
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.set_num_threads(threads)
