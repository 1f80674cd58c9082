"""int8 weights for CPU inference.

Decoding one token at a time reads every weight once per token, so on a CPU it runs at the speed memory delivers
the weights, not at the speed of the arithmetic. Storing the Linear weights as int8 (one scale per matrix) reads
a quarter of the bytes of float32. torch's dynamic quantization does it with its own maintained kernels (fbgemm):
weights are quantized once, activations per call; the embeddings, LayerNorms and attention stay float32.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers (the output head included) compute with int8 weights (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 announces that quantized tensor types will move to the torchao package; the path works today.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
