"""Sampling from a GPT one token at a time, with a KV cache.

Each step turns the logits of the last position into one token per row:

    logits ─► / temperature ─► keep top-k ─► keep nucleus (top-p) ─► softmax ─► draw (or argmax if temperature 0)

`generate_tokens` yields the tokens as they are chosen so that a CLI can print text while it is being written;
`GPT.generate` collects them into one tensor. Both run through the engine (engine.py), the one decoding path that
also serves many requests at once; this module holds the sampling controls it applies to each row.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor

from .errors import ConfigError
from .model import GPT, check_token_ids


def generate_tokens(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | int | None = None,
    stop_id: int | None = None,
    vocab_limit: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield max_new_tokens LongTensors of shape (B,): the next token of every row of `idx` (B, T).

    - temperature: > 0 divides the logits (below 1 sharper, above 1 flatter); 0 means greedy (argmax).
    - top_k: sample only among the k most likely tokens. top_p: only among the smallest set of most likely tokens
      whose probabilities add up to at least p (nucleus sampling). Both may be combined (top-k first).
    - generator: a torch.Generator, or an int seed, for reproducible draws.
    - stop_id: a row that emits it is finished; finished rows keep yielding stop_id (padding, so every step has
      one token per row), and the iteration ends as soon as all rows are finished.
    - use_cache: keep each layer's keys and values so that a step costs one position of work. Learned-position
      models slide a block_size window once the text outgrows it; then every cached key moves to a new position,
      so the cache is re-primed on the window. Sinusoidal, ALiBi and RoPE models just keep extending the cache.
    - vocab_limit: ids at or above it are never chosen: the unused rows of an embedding padded beyond the
      tokenizer's ids (common in pretrained models, e.g. 50304 rows for GPT-2's 50257 ids), which no text decodes.
    - compile: decode with a compiled step of fixed shapes, which a GPU replays as a CUDA graph (engine.py,
      static_step.py): the same tokens, several times faster at batch 1 once compiled; the first call compiles.

    The model is used as it is: call model.eval() first if it has dropout. Arguments are checked at the call,
    before the first token is asked for.
    """
    from .engine import Engine, Sampling, Sequence  # the engine builds on this module

    check_sampling_args(model.config.vocab_size, max_new_tokens, temperature, top_k, top_p, stop_id)
    check_token_ids(idx, model.config.vocab_size)
    if isinstance(generator, int):
        generator = torch.Generator(device=idx.device).manual_seed(generator)
    engine = Engine(model, max_batch=idx.shape[0], vocab_limit=vocab_limit, use_cache=use_cache, compile=compile)
    sampling = Sampling(temperature, top_k, top_p, generator)  # one for all rows: drawn together, in row order
    rows = [engine.add(Sequence(row, max_new_tokens, sampling, stop_id)) for row in idx.tolist()]
    return _steps(engine, rows, stop_id, idx.device)


def _steps(engine, rows: list, stop_id: int | None, device: torch.device) -> Iterator[Tensor]:
    step = 0
    while engine.has_work:
        engine.step()
        yield torch.tensor([row.tokens[step] if step < len(row.tokens) else stop_id for row in rows], device=device)
        step += 1


@contextlib.contextmanager
def decoding_attention() -> Iterator[None]:
    """Attention kernels for decoding: any but cuDNN's. Its kernel (torch's choice for half precision with an
    attention bias on recent GPUs) builds a new plan for every key length, and decoding grows that length by one
    each token: on an H200 that cost 6.4 ms per call, a bfloat16 6-layer model decoding at 23 tokens/s against
    393 in float32 (bench/cuda_check.sh). Training and evaluation keep one length and reuse their plan. Setting the
    flag directly costs ~4 us a token (torch.nn.attention.sdpa_kernel cost ~30, 3 % of a default-size CPU token)."""
    if not hasattr(torch.backends.cuda, "enable_cudnn_sdp"):  # older torch: no cuDNN attention to avoid
        yield
        return
    was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was_enabled)


def choose_next(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of `logits` (B, vocab) under the sampling controls of generate_tokens."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the shift keeps a tiny temperature finite
    if top_k is not None and top_k < logits.shape[-1]:
        logits = keep_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = keep_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest of each row set to -inf (exactly k survive, even with ties)."""
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Logits with everything outside the nucleus set to -inf.

    The nucleus is the shortest prefix of the tokens sorted by probability whose total reaches p: a token is
    kept when the mass of the tokens ranked above it is still below p. The most likely token always is, even for
    a p that float32 rounds to 0 (below ~1e-45), where that test would drop every token.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    outside = mass_above >= p
    outside[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def check_sampling_args(vocab_size: int, max_new_tokens: int, temperature: float, top_k: int | None,
                         top_p: float | None, stop_id: int | None) -> None:
    """Raise ConfigError naming the argument and its allowed range."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")
    if stop_id is not None and (not is_int(stop_id) or not 0 <= stop_id < vocab_size):
        raise ConfigError(f"stop_id must be a token id in [0, {vocab_size - 1}] (or None), got {stop_id!r}")


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)
