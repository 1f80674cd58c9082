"""Settings for every test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: handing them to several threads costs more than the work, and on a busy CI machine
    oversubscribed OpenMP threads spin (10x slower here). Restored afterwards for other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
