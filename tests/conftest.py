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


@pytest.fixture
def exact_float32():
    """Float32 matmuls in float32: TF32 (which a training run on CUDA switches on, for the whole process) would
    differ from them by about 1e-3. No effect on a CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
