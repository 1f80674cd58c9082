"""The attention kernels: FlexAttention computes what SDPA computes for every position kind, with and without a
cached prefix, in a training forward and in generation; `auto` picks as documented; what cannot run is refused.

Runs on the CPU, where FlexAttention runs unfused and has no backward, or where MINIGPT_TEST_DEVICE says
(bench/cuda_check.sh): there the compiled kernel runs, and trains.
"""
import os

import pytest
import torch

from minigpt import attention
from minigpt.attention import choose_attention
from minigpt.config import POSITION_KINDS, GPTConfig
from minigpt.errors import ConfigError
from minigpt.generate import generate_tokens
from minigpt.trainer import train

from helpers import records, tiny, tiny_config, write_corpus

DEVICE = torch.device(os.environ.get("MINIGPT_TEST_DEVICE", "cpu"))
FLEX_TRAINS = DEVICE.type == "cuda"  # torch has FlexAttention's backward on CUDA only
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # float32 logits, as the issue asks


pytestmark = pytest.mark.usefixtures("exact_float32")  # conftest.py


def model_with(positions: str, kernel: str, **overrides):
    model = tiny(positions, n_head=2, **overrides).to(DEVICE)  # head dimension 16: flex's smallest on CUDA
    model.attention = kernel
    return model


def ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_flex_equals_sdpa_in_a_training_forward(positions):
    """model.train(), the whole sequence, loss and logits; and the gradients where flex has a backward."""
    sdpa, flex = (model_with(positions, k, qk_norm=positions == "rope").train() for k in ("sdpa", "flex"))
    x, y = ids(), ids(seed=1)
    with torch.set_grad_enabled(FLEX_TRAINS):
        logits_s, loss_s = sdpa(x, y)
        logits_f, loss_f = flex(x, y)
    torch.testing.assert_close(logits_f, logits_s, **TOLERANCE)
    torch.testing.assert_close(loss_f, loss_s, **TOLERANCE)
    if FLEX_TRAINS:
        loss_s.backward()
        loss_f.backward()
        for (name, p), q in zip(sdpa.named_parameters(), flex.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOLERANCE, msg=name)


def test_where_flex_has_no_backward_training_with_it_is_refused():
    """On CUDA flex trains (the test above compares its gradients); elsewhere torch cannot, so neither do we."""
    config = GPTConfig(positions="alibi")
    if FLEX_TRAINS:
        assert choose_attention("flex", config, DEVICE, training=True) == "flex"
        return
    with pytest.raises(ConfigError, match=f"no FlexAttention backward on {DEVICE.type}.*use --attention sdpa"):
        choose_attention("flex", config, DEVICE, training=True)
    model = model_with("alibi", "flex").train()
    with pytest.raises(NotImplementedError, match="backward"):  # torch's own refusal, which ours spares the user
        model(ids(), ids())


def test_a_run_resumes_with_the_other_kernel(tmp_path):
    """Where flex trains (CUDA): 4 steps with flex, resumed for 4 with SDPA, lose what 8 SDPA steps lose. Where
    it cannot (a CPU), a resume that asks for it is refused before the checkpoint is touched."""
    corpus, cache = write_corpus(tmp_path / "corpus.txt", sentences=400), tmp_path / "cache"

    def run(out: str, kernel: str, steps: int, **more):
        return train(tiny_config(corpus, cache, tmp_path / out, {"positions": "alibi"}, attention=kernel,
                                 max_iters=steps, lr_decay_iters=8, eval_interval=4, eval_iters=2, **more))

    straight = run("sdpa", "sdpa", 8)
    if not FLEX_TRAINS:
        before = {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}
        with pytest.raises(ConfigError, match="--attention flex cannot be used here"):
            run("sdpa", "flex", 12, resume=True)
        assert {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()} == before
        return
    run("mixed", "flex", 4)
    mixed = run("mixed", "sdpa", 8, resume=True)
    expected = [r["loss"] for r in records(straight, "train")]
    assert [r["loss"] for r in records(mixed, "train")] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_flex_equals_sdpa_after_a_cached_prefix(positions):
    """Chunks of several queries on top of a KV cache (the queries are the last positions of the keys), past
    block_size where the positions allow it, against SDPA doing the same and against one full forward."""
    length = 16 if positions == "learned" else 24  # learned positions stop at block_size 16
    x = ids(length=length)
    chunks = ((0, 5), (5, 11), (11, length))
    results = {}
    for kernel in ("sdpa", "flex"):
        model = model_with(positions, kernel)
        cache = model.new_cache(2, length)
        with torch.no_grad():
            results[kernel] = torch.cat([model.head(model.hidden_states(x[:, a:b], cache)) for a, b in chunks], 1)
    torch.testing.assert_close(results["flex"], results["sdpa"], **TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(results["flex"], model(x)[0], **TOLERANCE)


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_flex_generation_equals_sdpa(positions):
    """Greedy generation (prefill with the kernel, decoding steps with SDPA) gives the same tokens; learned
    positions slide their window past block_size, which re-primes the cache through flex each step."""
    prompt = ids(length=7)
    tokens = {k: torch.stack(list(generate_tokens(model_with(positions, k), prompt, 20, temperature=0)), 1)
              for k in ("sdpa", "flex")}
    assert torch.equal(tokens["flex"], tokens["sdpa"])


def test_a_decoding_step_keeps_sdpa_and_a_prefill_uses_flex():
    model = model_with("alibi", "flex")
    assert isinstance(model._attention_mask(7, 0, 7), attention.FlexMask)
    assert isinstance(model._attention_mask(3, 7, 10), attention.FlexMask)  # a chunk after a cached prefix
    assert isinstance(model._attention_mask(1, 7, 8), attention.SdpaMask)


def test_the_block_mask_is_built_once_per_shape(monkeypatch):
    built = []
    real = attention.causal_block_mask
    monkeypatch.setattr(attention, "causal_block_mask", lambda *a: built.append(a[:2]) or real(*a))
    model = model_with("alibi", "flex")
    with torch.no_grad():
        for _ in range(3):
            model(ids())
        model(ids(length=9))
    assert built == [(16, 16), (9, 9)]


def test_alibi_score_mod_is_the_alibi_mask():
    """The score_mod adds, at each (query, key), the bias positions.alibi_mask holds there (a cached prefix of 4)."""
    from minigpt.positions import alibi_mask, alibi_slopes

    slopes = alibi_slopes(4)
    mod = attention.alibi_score_mod(slopes, offset=4)
    h, q, k = torch.meshgrid(torch.arange(4), torch.arange(3), torch.arange(7), indexing="ij")
    expected = alibi_mask(slopes, 3, 7)
    visible = torch.isfinite(expected)
    torch.testing.assert_close(mod(torch.zeros(()), 0, h, q, k)[visible], expected[visible])


@pytest.mark.parametrize("positions,device,dropout,training,expected", [
    ("alibi", "cuda", 0.0, True, "flex"),  # the bias tensor would keep SDPA off its flash kernel
    ("alibi", "cuda", 0.1, True, "sdpa"),  # flex has no dropout
    ("alibi", "cuda", 0.1, False, "flex"),  # sampling a model trained with dropout: dropout is off
    ("learned", "cuda", 0.0, True, "sdpa"),  # is_causal reaches the flash kernel already
    ("rope", "cuda", 0.0, True, "sdpa"),
    ("sinusoidal", "cuda", 0.0, False, "sdpa"),
    ("alibi", "cpu", 0.0, False, "sdpa"),  # unfused on CPU: slower than SDPA
    ("alibi", "mps", 0.0, True, "sdpa"),
])
def test_auto_is_flex_for_alibi_on_cuda_and_sdpa_elsewhere(positions, device, dropout, training, expected):
    config = GPTConfig(positions=positions, dropout=dropout)
    assert choose_attention("auto", config, torch.device(device), training) == expected
    assert choose_attention("sdpa", config, torch.device(device), training) == "sdpa"


def test_the_config_says_which_kernels_take_it():
    assert GPTConfig(dropout=0.1).attention_kernels(training=True) == ("sdpa",)
    assert GPTConfig(dropout=0.1).attention_kernels(training=False) == ("sdpa", "flex")
    assert GPTConfig().attention_kernels(training=True) == ("sdpa", "flex")
    assert GPTConfig(n_embd=32, n_head=2).attention_kernels(training=False) == ("sdpa", "flex")  # head dim 16
    assert GPTConfig(n_embd=32, n_head=4).attention_kernels(training=False) == ("sdpa",)  # 8


def test_what_cannot_run_is_refused_in_one_line(monkeypatch):
    config, cuda = GPTConfig(positions="alibi"), torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^unknown --attention 'flash'; use auto, sdpa, flex$"):
        choose_attention("flash", config, cuda, training=True)
    with pytest.raises(ConfigError, match=r"no dropout and this model trains with --dropout 0.1; use --attention "):
        choose_attention("flex", GPTConfig(dropout=0.1), cuda, training=True)
    assert choose_attention("flex", GPTConfig(dropout=0.1), cuda, training=False) == "flex"
    with pytest.raises(ConfigError, match=r"head dimension \(n_embd / n_head\) of at least 16, and this model's is 8"):
        choose_attention("flex", GPTConfig(positions="alibi", n_embd=32, n_head=4), cuda, training=False)
    assert choose_attention("auto", GPTConfig(positions="alibi", n_embd=32, n_head=4), cuda, training=True) == "sdpa"
    monkeypatch.setattr(attention, "_flex_module", None)  # a torch older than 2.5
    with pytest.raises(ConfigError, match=r"needs torch 2.5 or newer \(this is torch .*\); use --attention sdpa"):
        choose_attention("flex", config, cuda, training=False)
    assert choose_attention("auto", config, cuda, training=True) == "sdpa"


def test_an_unknown_kernel_is_refused_when_set():
    """GPT.attention is checked when set: "flash" once ran SDPA without a word."""
    model = tiny("alibi")
    with pytest.raises(ConfigError, match="sdpa, flex.*'flash'"):
        model.attention = "flash"
    assert model.attention == "sdpa"
    model.attention = "flex"
    assert model.attention == "flex"
