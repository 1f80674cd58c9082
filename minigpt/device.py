"""Which device to run on and in which precision: shared by training and sampling.

Only CUDA is asked about CUDA: on CPU and Apple `mps` nothing here touches torch.cuda, and whether autocast works
in a dtype is found out by trying it on the device itself.
"""
from __future__ import annotations

import warnings

import torch

from .config import DTYPES
from .errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto → cuda, else mps, else cpu; an accelerator that is asked for but absent is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was given but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps" and not torch.backends.mps.is_available():
        why = "macOS 12.3+ on Apple silicon is needed" if torch.backends.mps.is_built() else \
            f"this torch build ({torch.__version__}) has no MPS support"
        raise ConfigError(f"--device mps was given but MPS is not available ({why}); use --device cpu or --device auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype on `device` (None = plain float32); a ConfigError if the device cannot use it."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    chosen = choose_autocast_dtype(dtype, device.type, cuda_bf16)
    if chosen is None:
        return None
    usable = (chosen == torch.float16 or cuda_bf16) if device.type == "cuda" else _autocast_works(device, chosen)
    if not usable:
        name = str(chosen).removeprefix("torch.")
        raise ConfigError(f"--dtype {name} cannot be used on {device} (torch {torch.__version__}); use --dtype "
                          f"float32{' or float16' if device.type == 'cuda' else ''}")
    return chosen


def choose_autocast_dtype(dtype: str, device_type: str, cuda_bf16: bool) -> torch.dtype | None:
    """--dtype as an autocast dtype. "auto" is bfloat16 on a CUDA GPU that has it (Ampere and later), float16 on
    one without (T4, V100, GTX/RTX 20xx: the trainer then scales the loss), and float32 (None) on CPU and mps."""
    if dtype == "auto":
        return None if device_type != "cuda" else torch.bfloat16 if cuda_bf16 else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matmul under autocast on `device` really runs in `dtype` (torch switches autocast off, with a
    warning, for a dtype the device does not support)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                a = torch.ones(2, 2, device=device)
                return (a @ a).dtype == dtype
    except (RuntimeError, ValueError):
        return False
