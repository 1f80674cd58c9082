"""Sampling: KV cache equals full recompute, sampling controls keep to their sets, seeds reproduce, bad input."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.errors import ConfigError
from minigpt.generate import choose_next, generate_tokens

from helpers import KINDS, tiny


def prompt(batch=2, length=5, seed=0):
    return torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", KINDS)
def test_cached_logits_equal_full_forward(positions):
    """Feeding tokens one by one through the cache gives the logits of one full forward pass."""
    model = tiny(positions)
    idx = prompt(length=16)  # block_size for learned positions
    full = model(idx)[0]
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        first = model.head(model.hidden_states(idx[:, :4], cache))  # a prefill, then single steps
        steps = [model.head(model.hidden_states(idx[:, t:t + 1], cache)) for t in range(4, 16)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["sinusoidal", "alibi"])
def test_cached_chunk_after_a_prefix_equals_full_forward(positions):
    """Several new queries on top of a cache (queries = last positions of the keys), past block_size too."""
    model = tiny(positions, block_size=8)
    idx = prompt(length=20)
    cache = model.new_cache(2, 20)
    with torch.no_grad():
        parts = [model.head(model.hidden_states(idx[:, a:b], cache)) for a, b in ((0, 6), (6, 13), (13, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", KINDS)
def test_greedy_with_and_without_cache_is_identical_past_block_size(positions):
    model = tiny(positions)
    idx = prompt()
    with_cache = model.generate(idx, 40, temperature=0, use_cache=True)  # 45 tokens > block_size 16
    without = model.generate(idx, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)
    assert torch.equal(model.generate(idx, 40, top_k=1), with_cache)  # top_k=1 is greedy too


@pytest.mark.parametrize("positions", ["sinusoidal", "alibi"])
def test_each_cached_step_feeds_one_position(positions, monkeypatch):
    model = tiny(positions)
    seen = []
    original = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, cache=None: seen.append(idx.shape[1]) or original(idx, cache))
    list(generate_tokens(model, prompt(), 30, temperature=0))
    assert seen == [5] + [1] * 29


def test_learned_positions_slide_the_window_and_reprime_the_cache(monkeypatch):
    model = tiny("learned")
    seen = []
    original = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, cache=None: seen.append(idx.shape[1]) or original(idx, cache))
    list(generate_tokens(model, prompt(), 15, temperature=0))
    assert seen == [5] + [1] * 11 + [16] * 3  # the cache fills at 16 positions, then the window slides


def test_batch_generation_equals_row_by_row():
    model = tiny("alibi")
    idx = prompt(batch=3)
    together = model.generate(idx, 12, temperature=0)
    for row in range(3):
        assert torch.equal(model.generate(idx[row:row + 1], 12, temperature=0), together[row:row + 1])


@pytest.mark.parametrize("positions", KINDS)
def test_seeded_sampling_is_reproducible(positions):
    model = tiny(positions)
    idx = prompt()
    a = model.generate(idx, 20, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 20, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 20, temperature=1.0, top_p=0.9, generator=8)
    assert torch.equal(a, b)
    assert torch.equal(a, model.generate(idx, 20, temperature=1.0, top_p=0.9, generator=7))  # an int seed
    assert not torch.equal(a, c)


def test_top_k_never_samples_outside_the_k_largest():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, generator=gen)
    allowed = [set(torch.argsort(row, descending=True)[:5].tolist()) for row in logits]
    draws = torch.stack([choose_next(logits, 2.0, top_k=5, generator=gen) for _ in range(500)], dim=1)
    for row in range(4):
        assert set(draws[row].tolist()) == allowed[row]  # never outside, and (with temperature 2) all reached


def test_top_p_never_samples_outside_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, generator=gen) * 2
    nuclei = []
    for row in torch.softmax(logits, -1).tolist():  # the smallest set of most likely tokens with mass >= p
        order = sorted(range(37), key=lambda i: -row[i])
        mass, kept = 0.0, set()
        for i in order:
            kept.add(i)
            mass += row[i]
            if mass >= 0.6:
                break
        nuclei.append(kept)
    draws = torch.stack([choose_next(logits, 1.0, top_p=0.6, generator=gen) for _ in range(500)], dim=1)
    for row in range(4):
        assert set(draws[row].tolist()) == nuclei[row]


def test_a_top_p_too_small_for_float32_still_keeps_the_most_likely_token():
    """A top_p below float32's smallest number (~1e-45) rounds to 0 there, where `mass above >= p` holds for every
    token; the most likely token is kept all the same (it was NaN probabilities and an exception)."""
    logits = torch.randn(3, 37, generator=torch.Generator().manual_seed(0))
    for p in (1e-50, 1e-45, 1e-9):
        assert torch.equal(choose_next(logits, 1.0, top_p=p, generator=torch.Generator().manual_seed(1)),
                           logits.argmax(dim=-1))


def test_stop_id_finishes_rows_and_pads_them_with_stop_id():
    model = tiny("alibi")
    idx = prompt()
    free = model.generate(idx, 30, temperature=0)[:, 5:]
    stop = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    out = model.generate(idx, 30, temperature=0, stop_id=stop)[:, 5:]
    first = [(r == stop).nonzero()[0].item() if (r == stop).any() else None for r in free]
    for row, at in enumerate(first):
        if at is None:
            assert torch.equal(out[row], free[row])  # never stopped: all 30 tokens
        else:
            assert torch.equal(out[row, :at + 1], free[row, :at + 1])
            assert (out[row, at:] == stop).all()
    if all(at is not None for at in first):
        assert out.shape[1] == max(first) + 1  # generation ends when every row has stopped


def test_zero_new_tokens_returns_the_prompt():
    model = tiny("alibi")
    idx = prompt()
    assert torch.equal(model.generate(idx, 0), idx)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop_id=37), "stop_id"),
    ],
)
def test_bad_sampling_arguments_name_themselves(kwargs, word):
    model = tiny("alibi")
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=word):
        generate_tokens(model, prompt(), **args)  # refused at the call, not at the first token


def test_prompt_ids_outside_the_vocabulary_are_refused():
    model = tiny("alibi")
    with pytest.raises(ConfigError, match="token ids"):
        model.generate(torch.tensor([[3, 40]]), 3)


def test_cache_takes_the_dtype_of_the_keys_under_autocast():
    model = tiny("alibi")
    idx = prompt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = model.generate(idx, 8, temperature=0, use_cache=True)
        full = model.generate(idx, 8, temperature=0, use_cache=False)
    assert cached.shape == full.shape == (2, 13)


def test_a_tiny_temperature_is_greedy_not_a_crash():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.4]])
    assert choose_next(logits, temperature=1e-45, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]


def test_vocab_limit_never_chooses_the_rows_of_a_padded_embedding():
    """A pretrained model may have more embedding rows than its tokenizer has ids; the spare rows never decode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_weights=False)).eval()
    idx = prompt(batch=1)
    with torch.no_grad():  # make padding id 38 by far the most likely next token
        h = model.hidden_states(idx)[0, -1]
        model.head.weight[38] = 50 * h / h.norm()
        logits = model(idx)[0][0, -1]
    assert int(logits.argmax()) == 38
    greedy = next(generate_tokens(model, idx, 1, temperature=0, vocab_limit=37))
    assert int(greedy) == int(logits[:37].argmax())
    drawn = torch.stack(list(generate_tokens(model, idx.repeat(64, 1), 8, temperature=1.0, generator=1,
                                             vocab_limit=37)))
    assert int(drawn.max()) < 37
    with pytest.raises(ConfigError, match="vocab_limit"):
        generate_tokens(model, idx, 1, vocab_limit=41)


def test_decoding_keeps_off_the_cudnn_attention_kernel(monkeypatch):
    """cuDNN's kernel plans anew for every key length (6 ms a token on an H200), so decoding, whose key length grows
    each step, runs with it disabled; outside generation the setting is as it was."""
    import torch.nn.functional as F

    seen, real = [], F.scaled_dot_product_attention

    def attention(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    list(generate_tokens(tiny("alibi"), torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert len(seen) == 4 * 2 and not any(seen)  # 4 forward passes (prompt + 3 cached steps) x 2 layers
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
