"""The engine's compiled decoding step (static_step.py): fixed shapes, the same logits and tokens as the ordinary
step for every position kind, and graphs that CUDA graphs can replay: whole (no graph break), one per cache
capacity, never recompiled as the positions advance, rows join and leave, or engines come and go.

Runs on the CPU, where the step is compiled through AOTAutograd's eager backend (what is counted here is decided
before any backend runs; inductor's C++ code generation would take a minute on two busy cores), or where
MINIGPT_TEST_DEVICE says (bench/cuda_check.sh): on CUDA it is compiled as users get it, by inductor in mode
"reduce-overhead", and replayed as CUDA graphs.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch._dynamo.utils import counters

from minigpt.engine import Engine, Sampling, Sequence
from minigpt.config import POSITION_KINDS
from minigpt.errors import ConfigError
from minigpt import static_step
from minigpt.static_step import StaticRows, StaticStep

from helpers import run_engine, tiny

DEVICE = torch.device(os.environ.get("MINIGPT_TEST_DEVICE", "cpu"))


@pytest.fixture
def compiles(monkeypatch):
    """torch._dynamo's counters, cleared, and on the CPU torch.compile sent to the "aot_eager" backend."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def assert_whole_graphs(counts, graphs: int) -> None:
    assert not counts["graph_break"], f"graph breaks: {list(counts['graph_break'])}"
    assert counts["stats"]["unique_graphs"] == graphs
    assert not counts["inductor"]["cudagraph_skips"]  # on CUDA: every graph is replayed as a CUDA graph


def varied(positions: str, **overrides):
    """The tiny model with an untied head (its greedy text varies), on the test device."""
    return tiny(positions, tie_weights=False, **overrides).to(DEVICE)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 37, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def ragged_cache(model, prompts: list[list[int]], rows: int, capacity: int):
    """A cache of `rows` rows whose first ones hold the prompts (each prefilled alone), as the engine builds it."""
    cache = model.new_cache(rows, capacity)
    cache.reset(rows=0)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model.new_cache(1, len(prompt))
            model.hidden_states(torch.tensor([prompt], device=DEVICE), alone)
            cache.set_row(row, alone, 0)
    return cache


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_the_static_step_computes_what_the_ordinary_step_does(positions, compiles, exact_float32):
    """Rows of lengths 3, 9 and 5 and a free fourth row, decoded for 6 steps (past block_size 8 for the kinds that
    take any length): the fixed-shape step, eager and compiled, gives each row in use the logits of the ordinary
    step and leaves the same keys and values in the cache."""
    model = varied(positions, block_size=16 if positions == "learned" else 8)
    prompts = [ids(3, 1), ids(9, 2), ids(5, 3)]
    ordinary, eager, compiled = (ragged_cache(model, prompts, rows=4, capacity=16) for _ in range(3))
    step = StaticStep(model)
    with torch.inference_mode():  # as the engine steps
        for n in range(6):
            tokens = ids(3, 10 + n)
            expected = model.head(model.hidden_states(torch.tensor(tokens, device=DEVICE)[:, None], ordinary))[:, -1]
            layers = [eager.kv[layer, kind] for layer in range(2) for kind in (0, 1)]
            rows = StaticRows(layers, torch.tensor(list(eager.lengths) + [0], device=DEVICE))
            got = model.head(model.hidden_states(torch.tensor(tokens + [0], device=DEVICE)[:, None], rows))[:3, -1]
            eager.advance(1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step(compiled, tokens), expected, atol=1e-5, rtol=1e-5)
    for cache in (eager, compiled):
        assert cache.lengths == ordinary.lengths == (9, 15, 11)
        for row, length in enumerate(ordinary.lengths):
            torch.testing.assert_close(cache.kv[:, :, row, :, :length], ordinary.kv[:, :, row, :, :length])
    assert_whole_graphs(compiles, 1)


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_a_compiled_engine_decodes_the_greedy_tokens_of_the_eager_one(positions, compiles, exact_float32):
    """Greedy sequences of different lengths joining while others run, a full batch of 3 in which the fourth waits
    for a freed row, the learned model's windows sliding past block_size 16 (re-primed by a prefill): the
    tokens of the eager engine, from one graph, compiled once."""
    model = varied(positions)

    def sequences():
        return [Sequence(ids(4, 1), 18, Sampling(temperature=0)), Sequence(ids(9, 2), 12, Sampling(temperature=0)),
                Sequence(ids(2, 3), 6, Sampling(temperature=0)), Sequence(ids(5, 4), 10, Sampling(temperature=0))]

    eager, compiled = sequences(), sequences()
    run_engine(Engine(model, max_batch=3), eager[0], join_after={3: eager[1:2], 5: eager[2:]})
    run_engine(Engine(model, max_batch=3, compile=True), compiled[0], join_after={3: compiled[1:2], 5: compiled[2:]})
    assert [s.tokens for s in compiled] == [s.tokens for s in eager]
    assert all(s.finish_reason == "length" for s in compiled)
    assert_whole_graphs(compiles, 1)


def test_the_cache_filling_up_compiles_one_graph_per_capacity_and_engines_share_them(compiles):
    """A seeded sampled sequence and a greedy one decoded for 300 steps: every step of the first capacity (256) is
    one graph, the cache's growth to 512 one more; then a new engine (GPT.generate makes one per call) runs
    on the graphs already compiled. Tokens as the eager engine's."""
    model = varied("rope")

    def sequences():
        return [Sequence(ids(3, 1), 40, Sampling(1.0, top_k=10, generator=torch.Generator(DEVICE).manual_seed(1))),
                Sequence(ids(5, 2), 300, Sampling(temperature=0))]

    eager, compiled = sequences(), sequences()
    run_engine(Engine(model, max_batch=2), eager[0], join_after={10: eager[1:]})
    engine = Engine(model, max_batch=2, compile=True)
    run_engine(engine, compiled[0], join_after={10: compiled[1:]})
    assert [s.tokens for s in compiled] == [s.tokens for s in eager]
    assert engine.cache.capacity == 512
    assert_whole_graphs(compiles, 2)
    idx = torch.tensor([ids(6, 3), ids(6, 4)], device=DEVICE)
    again = model.generate(idx, 30, temperature=0, compile=True)
    assert torch.equal(again, model.generate(idx, 30, temperature=0))
    assert_whole_graphs(compiles, 2)


def test_engines_side_by_side_keep_their_own_buffers_and_a_later_one_takes_a_freed_one(compiles):
    """Two compiled engines stepped in turn decode what eager ones do, each in its own cache buffer; once they are
    gone, the next engine's cache moves into one of theirs (on a GPU: the address its CUDA graphs were recorded
    on, so they replay instead of being recorded again)."""
    model = varied("alibi")

    def decode(*engines: Engine) -> list[list[int]]:
        seqs = [engine.add(Sequence(ids(4, k), 12, Sampling(temperature=0))) for k, engine in enumerate(engines)]
        while any(engine.has_work for engine in engines):
            for engine in engines:
                engine.step()
        return [seq.tokens for seq in seqs]

    expected = decode(Engine(model, max_batch=1), Engine(model, max_batch=1))
    first, second = Engine(model, max_batch=1, compile=True), Engine(model, max_batch=1, compile=True)
    assert decode(first, second) == expected
    freed = {first.cache.kv.data_ptr(), second.cache.kv.data_ptr()}
    assert len(freed) == 2
    del first, second
    third = Engine(model, max_batch=1, compile=True)
    assert decode(third) == expected[:1]
    assert third.cache.kv.data_ptr() in freed
    assert_whole_graphs(compiles, 1)


def test_the_spare_buffers_keep_the_few_most_recent_shapes():
    """Each cache shape's buffer is kept for a later engine of that shape, but not every shape for the life of the
    process: beyond MAX_SPARE_BUFFERS the least recently given back is dropped."""
    model = tiny("alibi")
    static_step._spare_buffers.clear()
    try:
        for rows in range(1, static_step.MAX_SPARE_BUFFERS + 3):  # the steps of engines of 1, 2, ... rows
            cache = model.new_cache(rows, 8)
            cache.kv = torch.zeros(cache.shape)
            step = StaticStep(model)
            step._adopt(cache)
            del step  # gives its buffer back
        assert [key[0][2] for key in static_step._spare_buffers] == list(range(3, static_step.MAX_SPARE_BUFFERS + 3))
    finally:
        static_step._spare_buffers.clear()


def test_compile_without_the_cache_is_refused():
    with pytest.raises(ConfigError, match="use_cache=False"):
        Engine(tiny("alibi"), compile=True, use_cache=False)
