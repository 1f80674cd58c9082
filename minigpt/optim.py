"""AdamW (or Muon + AdamW) with weight-decay groups, the learning-rate schedules (warmup, then cosine, linear,
constant or warmup-stable-decay), and gradient clipping."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .config import TrainConfig
from .errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices of Linear layers) and an undecayed one.

    Decoupled weight decay pulls weights towards zero; that is a useful prior for the matrices that mix features,
    but not for biases and LayerNorm gains (decaying a gain towards 0 switches a channel off), nor, by choice, for
    embeddings (a rare token's row would shrink just for being rare). Embeddings are the only >= 2-D parameters
    that are not Linear weights, so they are found by module type. A tied output head shares the embedding's
    Parameter object, and `named_parameters()` yields a shared Parameter once, so it is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str, kind: str = "adamw", muon_lr: float = 0.02) -> torch.optim.AdamW | MuonAdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA (one launch for all tensors), foreach elsewhere.

    kind="muon": the 2-D weight matrices of the transformer blocks go to Muon at peak rate `muon_lr`, with the
    same decoupled weight decay; embeddings, the output head, norms and biases stay with AdamW at `lr`.
    """
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {"foreach": True}
    groups = param_groups(model, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in hidden]
    matrices = [p for p in model.parameters() if id(p) in hidden]
    # `lr_scale` keeps Muon at muon_lr / lr times the scheduled rate at every step (see set_lr).
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": muon_lr / lr}], lr=muon_lr, weight_decay=weight_decay)
    return MuonAdamW(torch.optim.AdamW(groups, lr=lr, betas=betas, **extra), muon)


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepping together as one optimizer.

    Muon (Jordan et al., 2024) follows the momentum of a matrix's gradient, but replaces that momentum by the
    nearest semi-orthogonal matrix (all singular values 1, found by a few Newton-Schulz iterations) before the
    step: every direction of the matrix moves by the same amount, instead of the few dominant ones. That only
    makes sense for matrices that map features to features, so embeddings, the head and vectors stay on AdamW.

    The trainer and the checkpoint see a single optimizer: `param_groups` are AdamW's followed by Muon's, and
    the state dict is laid out like one torch optimizer's (parameters numbered on through both), so the
    schedule, saving and an exact resume need no special case. Under DDP each rank steps on the same averaged
    gradients, so every rank computes the same update.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer) -> None:
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + index: slots for index, slots in sd["state"].items()})
            groups += [{**group, "params": [offset + i for i in group["params"]]} for group in sd["param_groups"]]
            offset += sum(len(group["params"]) for group in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(groups)} parameter groups, this one "
                             f"{len(self.param_groups)}")
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            indices = {i for group in mine for i in group["params"]}
            opt.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if int(i) in indices},
                                 "param_groups": mine})


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then `schedule` until `decay_iters`.

    Warmup starts at lr / warmup_iters rather than 0 so that the first step is not wasted. After it:
      cosine    half a cosine from lr down to min_lr at decay_iters (GPT-3, nanoGPT), then flat;
      linear    a straight line from lr down to min_lr at decay_iters, then flat;
      constant  lr for ever (min_lr is not used);
      wsd       warmup-stable-decay: lr until the last `decay_fraction` of decay_iters, then a straight line
                to min_lr (nanochat's choice: a checkpoint from the stable phase can be trained on for longer
                and decayed later, which a cosine run cannot, as its rate falls from the first step).
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if schedule == "constant":
        return lr
    if step >= decay_iters:
        return min_lr
    decay_start = warmup_iters
    if schedule == "wsd":
        decay_start = max(warmup_iters, decay_iters - round(decay_fraction * decay_iters))
    progress = (step - decay_start) / max(1, decay_iters - decay_start)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr - max(0.0, progress) * (lr - min_lr)  # linear, and wsd (progress < 0 in its stable phase)


@dataclass
class Schedule:
    """How many steps the run takes and the learning rate at each: the settings' values, except that a time
    budget fixes `max_iters` (and may shorten `warmup_iters`) once it has timed the first steps. The trainer reads
    both from here, never from a rewritten copy of its settings; the checkpoint's config.json records them."""

    max_iters: int
    warmup_iters: int
    lr: float
    min_lr: float
    decay_iters: int | None = None  # where the decay ends; None: at max_iters
    kind: str = "cosine"
    decay_fraction: float = 0.2

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Schedule:
        return cls(cfg.max_iters, cfg.warmup_iters, cfg.lr, cfg.final_lr, cfg.lr_decay_iters, cfg.lr_schedule,
                   cfg.decay_fraction)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_iters, self.decay_iters or self.max_iters, self.kind,
                     self.decay_fraction)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set the scheduled rate; a group with an `lr_scale` (Muon's matrices) runs at that multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients *before* clipping; scales them down to `max_norm` when it is > 0.

    The norm is returned even when clipping is off because it is worth logging: a spike is the first sign of
    a learning rate that is too high.
    """
    params = [p for p in parameters if p.grad is not None]
    # With max_norm = inf the scale factor is clamped to exactly 1.0: gradients are left as they are.
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
