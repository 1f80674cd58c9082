"""AdamW with weight-decay groups, the learning-rate schedules (warmup, then cosine, linear, constant or
warmup-stable-decay), and gradient clipping."""
from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch
from torch import nn


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
                   device_type: str) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA (one launch for all tensors), foreach elsewhere."""
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, **extra)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients *before* clipping; scales them down to `max_norm` when it is > 0.

    The norm is returned even when clipping is off because it is worth logging: a spike is the first sign of
    a learning rate that is too high.
    """
    params = [p for p in parameters if p.grad is not None]
    # With max_norm = inf the scale factor is clamped to exactly 1.0: gradients are left as they are.
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
