"""--compile pays only if the model compiles into whole graphs, once each: no graph breaks (each one splits the
step into pieces compiled apart, and the token-id check's was a host sync too), no recompilation when training
and evaluation alternate, and no batch size turned symbolic by a short last evaluation batch.

Runs on the CPU, or where MINIGPT_TEST_DEVICE says (bench/cuda_check.sh): on CUDA the ALiBi model trains with
FlexAttention (auto), so the compiled flex kernel is in the graphs too.
"""
import functools
import os

import pytest
import torch
from torch._dynamo.utils import counters

from minigpt.trainer import train

from helpers import records, tiny_config, write_corpus

DEVICE = os.environ.get("MINIGPT_TEST_DEVICE", "cpu")


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The example inputs of every graph torch.compile compiles from now on; torch._dynamo's counters, cleared.

    Each graph passes through a backend that records it, then goes on to inductor, as in a real run, on a GPU. On
    the CPU it goes to AOTAutograd's eager backend instead (which still traces forward and backward): what is
    counted here is decided before any backend runs, and inductor's C++ code generation would take over a minute
    on two busy cores."""
    backend = torch._dynamo.lookup_backend("aot_eager" if DEVICE == "cpu" else "inductor")
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(example_inputs)
        return backend(graph, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    torch._dynamo.reset()
    counters.clear()
    yield graphs
    torch._dynamo.reset()


def symbolic(inputs) -> bool:
    """Whether a graph was compiled for symbolic sizes (dynamic shapes) rather than the sizes it was given."""
    return any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor) and
               any(isinstance(s, torch.SymInt) for s in x.shape) for x in inputs)


def test_training_with_evaluations_between_compiles_each_graph_once_whole(tmp_path, compiled_graphs):
    """Evaluations at steps 0, 2 and 4 around training steps, the validation split ending in a short batch (3
    windows of 16 tokens after a full batch of 8): one graph for the training step, one for evaluation's full
    batches, one for its short last batch, each compiled once for its own sizes, and not a single graph break."""
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=400)
    out = train(tiny_config(corpus, tmp_path / "cache", tmp_path / "out", {"positions": "alibi"}, compile=True,
                            max_iters=4, eval_interval=2, eval_iters=2))
    assert [r["step"] for r in records(out, "eval")] == [0, 2, 4]
    assert not counters["graph_break"], f"graph breaks: {list(counters['graph_break'])}"
    assert len(compiled_graphs) == 3
    assert not any(symbolic(inputs) for inputs in compiled_graphs)


def test_a_compiled_flex_model_is_one_graph_and_computes_what_sdpa_does(compiled_graphs, exact_float32):
    """Inside a compiled model FlexAttention is part of the graph, its BlockMask and ALiBi score_mod built in it
    (attention.py keeps its caches out of compiled code): one graph, no break, SDPA's logits."""
    from helpers import tiny

    model = tiny("alibi", n_head=2).to(DEVICE)  # head dimension 16: flex's smallest on CUDA
    x = torch.randint(0, 37, (2, 16), device=DEVICE)
    with torch.no_grad():
        expected = model(x)[0]
        model.attention = "flex"
        compiled = torch.compile(model, dynamic=False)
        logits = [compiled(x)[0] for _ in range(2)]
    assert not counters["graph_break"], f"graph breaks: {list(counters['graph_break'])}"
    assert len(compiled_graphs) == 1
    for got in logits:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
