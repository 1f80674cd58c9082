"""The engine and its KV cache with rows of their own lengths: every row computes what it would alone, judged by
full forward passes; sequences join, leave and sample with their own settings and generators."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt.engine import Engine, Sampling, Sequence
from minigpt.config import POSITION_KINDS
from minigpt.errors import ConfigError
from minigpt.generate import generate_tokens
from minigpt.attention import causal_mask_rows
from minigpt.positions import alibi_mask, alibi_mask_rows, alibi_slopes

from helpers import run_engine, tiny


def varied(positions: str, **overrides):
    """The tiny model with an untied head: its greedy text varies (a tied one mostly repeats its last token)."""
    return tiny(positions, tie_weights=False, **overrides)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 37, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """The slow reference: one forward pass over the whole text (the last block_size tokens for learned ones)."""
    if model.config.positions == "learned":
        tokens = tokens[-model.config.block_size:]
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1]


def greedy_reference(model, prompt: list[int], new: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new):
        tokens.append(int(full_logits(model, tokens).argmax()))
    return tokens[len(prompt):]


def ragged_cache(model, prompts: list[list[int]]):
    """A cache whose rows hold the prompts (each prefilled alone), as the engine builds it."""
    cache = model.new_cache(len(prompts), 32)
    cache.reset(rows=0)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model.new_cache(1, len(prompt))
            model.hidden_states(torch.tensor([prompt]), alone)
            cache.set_row(row, alone, 0)
    return cache


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_rows_of_different_lengths_each_compute_what_they_would_alone(positions):
    """Decoding steps and a chunk of several positions on rows of lengths 3, 9 and 5 (past block_size 8 for
    the kinds that take any length) give each row the logits of a full forward over its own text."""
    model = varied(positions, block_size=16 if positions == "learned" else 8)
    texts = [ids(3, 1), ids(9, 2), ids(5, 3)]
    cache = ragged_cache(model, texts)
    assert cache.lengths == (3, 9, 5) and isinstance(cache.length, torch.Tensor)
    with torch.no_grad():
        for step in range(4):
            new = ids(3, 10 + step)
            logits = model.head(model.hidden_states(torch.tensor(new)[:, None], cache))[:, -1]
            for row, token in enumerate(new):
                texts[row].append(token)
                torch.testing.assert_close(logits[row], full_logits(model, texts[row]), atol=1e-5, rtol=1e-5)
        chunk = [ids(3, 20 + row) for row in range(3)]  # three positions at once on top of the rows
        logits = model.head(model.hidden_states(torch.tensor(chunk), cache))
        for row in range(3):
            for t in range(3):
                reference = full_logits(model, texts[row] + chunk[row][:t + 1])
                torch.testing.assert_close(logits[row, t], reference, atol=1e-5, rtol=1e-5)
    assert cache.lengths == (10, 16, 12)


def test_positions_past_a_rows_length_hold_zeros_not_uninitialised_memory():
    """Attention multiplies the values of masked keys by a zero weight, and 0 x NaN is NaN: the storage a
    shorter row is given past its own length must be finite, after growing too."""
    model = varied("alibi")
    cache = ragged_cache(model, [ids(3, 1), ids(9, 2)])
    cache.reserve(64)
    assert cache.kv.shape[4] == 64 and torch.isfinite(cache.kv).all()
    assert not cache.kv[:, :, 0, :, 3:].any() and not cache.kv[:, :, 1, :, 9:].any()


def test_row_masks_equal_the_equal_length_masks_of_each_row():
    start = torch.tensor([2, 6, 0])
    mask = causal_mask_rows(start, 2, 8)
    assert mask.shape == (3, 1, 2, 8)
    slopes = alibi_slopes(4)
    bias = alibi_mask_rows(slopes, start, 2, 8)
    assert bias.shape == (3, 4, 2, 8)
    for row, s in enumerate(start.tolist()):
        k_len = s + 2
        own = torch.ones(2, k_len).tril(diagonal=s).bool()  # query i (position s + i) sees keys 0..s+i
        assert torch.equal(mask[row, 0, :, :k_len], own) and not mask[row, 0, :, k_len:].any()
        assert torch.equal(bias[row, :, :, :k_len], alibi_mask(slopes, 2, k_len))
        assert torch.isneginf(bias[row, :, :, k_len:]).all()


def test_equal_rows_keep_the_fast_path_without_a_mask(monkeypatch):
    """Rows of one length decode with an int position and no mask (as before rows could differ)."""
    masks = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: masks.append(k.get("attn_mask")) or real(*a, **k))
    list(generate_tokens(tiny("learned"), torch.zeros(3, 4, dtype=torch.long), 3, temperature=0))
    assert masks == [None] * (3 * 2)  # a prefill (is_causal) and two steps, two layers each: never a mask


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_sequences_joining_at_different_steps_decode_as_alone(positions):
    """Greedy sequences of different prompt lengths joining while others run (the learned model's windows
    slide past block_size 16 at different steps) give the tokens of full forward passes."""
    model = varied(positions)
    first = Sequence(ids(4, 1), 18, Sampling(temperature=0))
    second = Sequence(ids(9, 2), 12, Sampling(temperature=0))
    third = Sequence(ids(2, 3), 6, Sampling(temperature=0))
    run_engine(Engine(model, max_batch=4), first, join_after={3: [second], 5: [third]})
    for seq in (first, second, third):
        assert seq.finish_reason == "length"
        assert seq.tokens == greedy_reference(model, seq.prompt, seq.max_new_tokens)


def test_a_seeded_sequence_draws_the_same_tokens_alone_or_among_others():
    model = varied("alibi")

    def seeded():
        return Sequence(ids(5, 1), 20, Sampling(1.0, top_k=20, top_p=0.95,
                                                generator=torch.Generator().manual_seed(5)))

    alone = seeded()
    run_engine(Engine(model), alone)
    together = seeded()
    others = [Sequence(ids(3, 2), 25, Sampling(1.0, generator=torch.Generator().manual_seed(5))),  # same seed
              Sequence(ids(8, 3), 10, Sampling(0.7)),  # the global generator
              Sequence(ids(6, 4), 15, Sampling(temperature=0)),
              Sequence(ids(5, 1), 20, Sampling(1.0, top_k=20, top_p=0.95))]  # same settings, no seed
    run_engine(Engine(model, max_batch=3), others[0], others[1], join_after={2: [together], 4: others[2:]})
    assert together.tokens == alone.tokens
    unseeded = Sequence(ids(5, 1), 20, Sampling(1.0, top_k=20, top_p=0.95, generator=torch.Generator().manual_seed(6)))
    run_engine(Engine(model), unseeded)
    assert unseeded.tokens != alone.tokens  # the seed matters


def test_a_full_batch_queues_the_rest_and_frees_rows_as_sequences_finish():
    model = varied("rope")
    seqs = [Sequence(ids(3 + i, i), 4 + 3 * i, Sampling(temperature=0)) for i in range(5)]
    engine = Engine(model, max_batch=2)
    for seq in seqs:
        engine.add(seq)
    engine.step()
    assert engine.running == seqs[:2] and list(engine.waiting) == seqs[2:]
    run_engine(engine)
    for seq in seqs:
        assert seq.tokens == greedy_reference(model, seq.prompt, seq.max_new_tokens)
    assert engine.cache.capacity >= 3 + 4 + 12 - 1  # grew for the longest request


def test_stop_id_and_cancel_free_the_row_at_once():
    model = varied("alibi")
    free = greedy_reference(model, ids(4, 1), 10)
    stopper = Sequence(ids(4, 1), 10, Sampling(temperature=0), stop_id=free[2])
    runner = Sequence(ids(6, 2), 10, Sampling(temperature=0))
    leaver = Sequence(ids(5, 3), 10, Sampling(temperature=0))
    never = Sequence(ids(5, 4), 10, Sampling(temperature=0))
    engine = Engine(model, max_batch=3)
    for seq in (stopper, runner, leaver, never):
        engine.add(seq)
    engine.step()
    Engine.cancel(leaver)
    Engine.cancel(never)  # still waiting: dropped before it costs anything
    changed = engine.step()
    assert leaver.finish_reason == never.finish_reason == "cancelled" and leaver in changed and never in changed
    assert engine.running == [stopper, runner] and not engine.waiting and never.tokens == []
    run_engine(engine)
    assert stopper.finish_reason == "stop" and stopper.tokens == free[:free.index(free[2]) + 1]
    assert runner.tokens == greedy_reference(model, runner.prompt, 10)
    assert len(leaver.tokens) == 1


def test_logprobs_are_those_of_a_full_forward():
    model = varied("sinusoidal")
    seq = Sequence(ids(5, 1), 4, Sampling(temperature=0), logprobs=3, prompt_logprobs=True)
    run_engine(Engine(model, vocab_limit=30), Sequence(ids(7, 2), 6), seq)
    text = seq.prompt + seq.tokens
    for t, token in enumerate(text[1:], start=1):
        reference = torch.log_softmax(full_logits(model, text[:t])[:30], dim=-1)
        record = seq.prompt_logprobs[t] if t < len(seq.prompt) else seq.logprobs[t - len(seq.prompt)]
        assert record.logprob == pytest.approx(float(reference[token]), abs=1e-5)
        values, top = reference.topk(3)
        assert [i for i, _ in record.top] == top.tolist()
        assert [v for _, v in record.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert seq.prompt_logprobs[0] is None and len(seq.logprobs) == 4
    assert max(seq.tokens) < 30  # vocab_limit holds for every row


def test_no_cache_engine_equals_the_cached_one():
    model = varied("learned")
    cached, recomputed = (Sequence(ids(5, 1), 20, Sampling(temperature=0)) for _ in range(2))
    run_engine(Engine(model), cached)
    run_engine(Engine(model, use_cache=False), recomputed)
    assert cached.tokens == recomputed.tokens == greedy_reference(model, cached.prompt, 20)


@pytest.mark.parametrize("seq, word", [
    (lambda: Sequence([], 3), "prompt"),
    (lambda: Sequence([40], 3), "token ids"),
    (lambda: Sequence([1], 3, Sampling(temperature=-1)), "temperature"),
    (lambda: Sequence([1], 3, Sampling(top_p=0.0)), "top_p"),
    (lambda: Sequence([1], -1), "max_new_tokens"),
    (lambda: Sequence([1], 3, logprobs=-2), "logprobs"),
])
def test_bad_sequences_are_refused_when_added(seq, word):
    with pytest.raises(ConfigError, match=word):
        Engine(tiny("alibi")).add(seq())
