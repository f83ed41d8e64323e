"""Unit-test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny kernels: intra-op threads only add wake-up latency on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
