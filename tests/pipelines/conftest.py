"""What the pipeline tests share."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: with tiny matrices on a shared 2-core machine the thread pool's
    hand-offs, not the arithmetic, set the time (25x for the canary audits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
