"""Settings for every test."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: handing them to several threads costs more than the work, and on a busy CI machine
    oversubscribed OpenMP threads spin (10x slower here). For the whole session, so that module-scoped fixtures
    (set up before any function-scoped one) train on one thread too: a run compared with another must do its
    float sums in the same order. Restored at the end."""
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
