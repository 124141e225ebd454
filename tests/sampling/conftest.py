import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
