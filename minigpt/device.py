"""Which device to run on and in which precision: shared by training and sampling."""
from __future__ import annotations

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
        raise ConfigError("--device mps was given but MPS is not available; use --device cpu or --device auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32): bfloat16 on CUDA under "auto", float32 elsewhere."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
