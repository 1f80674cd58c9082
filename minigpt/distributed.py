"""torchrun plumbing: which process this is, the process group's set-up and teardown, and the few collectives the
trainer needs. Run as plain `python train.py`, this is rank 0 of 1 and every collective is the identity.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run as plain `python train.py`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc_per_node)

    @classmethod
    def from_env(cls) -> Dist:
        """What torchrun put in the environment (nothing: a single process)."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(int(os.environ.get("RANK", 0)), world_size, int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_device_name(self, name: str) -> None:
        """Under torchrun the GPU is chosen by LOCAL_RANK: a --device that names one would put ranks on one GPU."""
        if self.enabled and ":" in name:
            raise ConfigError(f"under torchrun each process uses the GPU of its LOCAL_RANK; pass --device cuda (or "
                              f"auto), not --device {name}")

    @contextlib.contextmanager
    def process_group(self, device: torch.device) -> Iterator[None]:
        """Make `device` current and, under torchrun, hold the process group for the body of the `with`.

        Whoever holds a DDP wrapper must drop it before the body ends: the group is destroyed on the way out.
        """
        if self.enabled and device.type == "mps":
            raise ConfigError("torchrun with --device mps is not supported (one Apple GPU per machine); train with "
                              "plain `python train.py --device mps`, or use cuda or cpu under torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives and RNG calls that use "the current device" mean this GPU
        if not self.enabled:
            yield
            return
        # DDP imports torch.distributed.nn (through torch.distributed._shard), whose functions have `group=WORLD`
        # defaults: imported after the group exists, they would hold it for good, and destroy_process_group()
        # could not free it (see below).
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
        try:
            yield
        finally:
            # Free the group now, while the interpreter is whole. A gloo group that survives to interpreter
            # shutdown has worker threads that may still release a finished collective there, which aborts the
            # process (SIGABRT, "terminate called without an active exception"). The DDP wrapper holds the
            # group and sits in reference cycles, hence the collection before destroying.
            gc.collect()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def from_main(self, value: float, device: torch.device) -> float:
        """Rank 0's `value` on every rank, so that what is decided from it (stop now, how many steps) is the same
        everywhere."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (tensors in it must be on the CPU)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def resume_command(out: Path) -> str:
    """The shell command that continues the run in `out`: torchrun's when this run is one of its jobs."""
    world, launcher = Dist.from_env(), "python"
    if world.enabled:
        per_node = world.local_world_size
        nodes = world.world_size // per_node
        launcher = "torchrun" + (f" --nnodes={nodes}" if nodes > 1 else "") + f" --nproc_per_node={per_node}"
    return f"{launcher} train.py --resume --out-dir {shlex.quote(str(out))}"
