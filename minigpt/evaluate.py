"""Deterministic evaluation: loss, perplexity and bits per byte over sequential windows of a token array."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
                  max_batches: int | None, byte_lengths: np.ndarray | None = None,
                  device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None) -> dict[str, float | None]:
    """Mean next-token loss over `max_batches` batches of non-overlapping windows spread evenly over `tokens`.

    The windows are fixed by the arguments alone (window k of n starts at token floor(k * W / n) * T, for W windows
    in all), so two calls see the same data and numbers from different runs and checkpoints are comparable; and
    being spread over the whole array rather than taken from its start, a few batches sample every part of it
    instead of its first documents only. With max_batches None every window is scored once; the tail that does
    not fill a window is dropped. Bits per byte divides the summed loss (in bits) by the number of bytes the target
    tokens decode to (`byte_lengths[id]`, from `Tokenizer.token_byte_lengths()`): unlike loss per token it does
    not depend on the tokenizer, so a 256-token byte model and a 4096-token BPE model can be compared.
    """
    total_windows = (len(tokens) - 1) // block_size
    if total_windows < 1:
        raise ConfigError(f"cannot evaluate with block size {block_size} on {len(tokens)} tokens; "
                          f"use a smaller --block-size or more data")
    windows = total_windows if max_batches is None else min(total_windows, max_batches * batch_size)
    starts = np.arange(windows) * total_windows // windows * block_size
    offsets = np.arange(block_size + 1)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    try:
        for first in range(0, windows, batch_size):
            chunk = np.asarray(tokens[starts[first:first + batch_size, None] + offsets], dtype=np.int64)
            x = torch.from_numpy(chunk[:, :-1]).to(device)
            y = torch.from_numpy(chunk[:, 1:]).to(device)
            with autocast:
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total_nats += nats.item()
            total_tokens += y.numel()
            if byte_lengths is not None:
                total_bytes += int(byte_lengths[chunk[:, 1:]].sum())
    finally:
        model.train(was_training)
    loss = total_nats / total_tokens
    bits_per_byte = total_nats / math.log(2) / max(1, total_bytes) if byte_lengths is not None else None
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bits_per_byte,
            "tokens": total_tokens}
