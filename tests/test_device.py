"""Device and precision choice: --dtype auto as a pure function of what the device can do; refusals in one line."""
import pytest
import torch

from minigpt import device as device_module
from minigpt.device import autocast_dtype, choose_autocast_dtype
from minigpt.errors import ConfigError


@pytest.mark.parametrize("dtype,device_type,cuda_bf16,expected", [
    ("auto", "cuda", True, torch.bfloat16),  # Ampere and later
    ("auto", "cuda", False, torch.float16),  # T4, V100, RTX 20xx: float16 with loss scaling
    ("auto", "cpu", False, None),
    ("auto", "mps", False, None),
    ("float32", "cuda", True, None),
    ("float16", "cuda", True, torch.float16),
    ("bfloat16", "cpu", False, torch.bfloat16),
    ("float16", "cpu", False, torch.float16),
])
def test_auto_dtype_is_a_function_of_the_device(dtype, device_type, cuda_bf16, expected):
    assert choose_autocast_dtype(dtype, device_type, cuda_bf16) == expected


def test_cpu_autocast_in_float16_runs_in_float16():
    assert autocast_dtype("float16", torch.device("cpu")) == torch.float16
    assert autocast_dtype("auto", torch.device("cpu")) is None


def test_a_dtype_the_device_cannot_use_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(device_module, "_autocast_works", lambda device, dtype: False)
    with pytest.raises(ConfigError, match=r"^--dtype float16 cannot be used on cpu .*use --dtype float32$"):
        autocast_dtype("float16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown --dtype 'float64'; use auto, float32, bfloat16, float16"):
        autocast_dtype("float64", torch.device("cpu"))
