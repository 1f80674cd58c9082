"""evaluate_loss against a slow reference: one window at a time, the loss the model itself reports."""
import math

import numpy as np
import pytest
import torch

from minigpt.errors import ConfigError
from minigpt.evaluate import evaluate_loss

from helpers import tiny

T = 8


def reference(model, tokens, windows, byte_lengths):
    """Mean of the model's own loss over the given window indices, and bits per byte from the byte counts."""
    nats, n_bytes = 0.0, 0
    for w in windows:
        chunk = torch.tensor(tokens[w * T: w * T + T + 1], dtype=torch.long)
        _, loss = model(chunk[None, :-1], chunk[None, 1:])
        nats += loss.item() * T
        n_bytes += int(sum(byte_lengths[t] for t in chunk[1:].tolist()))
    return nats / (T * len(windows)), nats / math.log(2) / n_bytes


@pytest.fixture
def setup():
    model = tiny("alibi")
    tokens = np.random.default_rng(0).integers(0, 37, size=10 * T + 5).astype(np.uint16)
    byte_lengths = np.random.default_rng(1).integers(1, 4, size=37)
    return model, tokens, byte_lengths


def test_all_windows_once(setup):
    model, tokens, byte_lengths = setup
    result = evaluate_loss(model, tokens, T, batch_size=3, max_batches=None, byte_lengths=byte_lengths)
    loss, bpb = reference(model, tokens, range(10), byte_lengths)
    assert result["tokens"] == 10 * T
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_a_few_batches_are_spread_over_the_whole_array(setup):
    model, tokens, byte_lengths = setup
    result = evaluate_loss(model, tokens, T, batch_size=2, max_batches=2, byte_lengths=byte_lengths)
    loss, bpb = reference(model, tokens, [0, 2, 5, 7], byte_lengths)  # 4 of 10 windows: k * 10 // 4
    assert result["tokens"] == 4 * T
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)


def test_leaves_the_model_in_training_mode_and_refuses_too_few_tokens(setup):
    model, tokens, _ = setup
    model.train()
    evaluate_loss(model, tokens, T, batch_size=4, max_batches=1)
    assert model.training
    with pytest.raises(ConfigError, match="block size"):
        evaluate_loss(model, tokens[:T], T, batch_size=4, max_batches=1)
