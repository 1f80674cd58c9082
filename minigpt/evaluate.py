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
    """Mean next-token loss over the first `max_batches` batches of non-overlapping windows of `tokens`.

    Windows are taken in order (window i predicts tokens[i*T+1 : (i+1)*T+1]), so two calls see the same data and
    every target token is scored once: numbers from different runs and checkpoints are comparable. The last
    partial window is dropped. Bits per byte divides the summed loss (in bits) by the number of bytes the target
    tokens decode to (`byte_lengths[id]`, from `Tokenizer.token_byte_lengths()`): unlike loss per token it does
    not depend on the tokenizer, so a 256-token byte model and a 4096-token BPE model can be compared.
    """
    windows = (len(tokens) - 1) // block_size
    if windows < 1:
        raise ConfigError(f"cannot evaluate with block size {block_size} on {len(tokens)} tokens; "
                          f"use a smaller --block-size or more data")
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    try:
        for start in range(0, windows, batch_size):
            count = min(batch_size, windows - start)
            chunk = np.asarray(tokens[start * block_size: (start + count) * block_size + 1], dtype=np.int64)
            x = torch.from_numpy(chunk[:-1].reshape(count, block_size)).to(device)
            y = torch.from_numpy(chunk[1:].reshape(count, block_size)).to(device)
            with autocast:
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum")
            total_nats += nats.item()
            total_tokens += y.numel()
            if byte_lengths is not None:
                total_bytes += int(byte_lengths[chunk[1:]].sum())
    finally:
        model.train(was_training)
    loss = total_nats / total_tokens
    bits_per_byte = total_nats / math.log(2) / max(1, total_bytes) if byte_lengths is not None else None
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bits_per_byte,
            "tokens": total_tokens}
