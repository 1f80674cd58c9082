"""Which attention kernel runs, and the mask (and ALiBi's bias) in the form each kernel takes.

Both kernels compute softmax(q·kᵀ / sqrt(d_head) + bias) · v, each query seeing only the keys at or before it:

- ``sdpa``: torch's scaled_dot_product_attention. Causality comes from its `is_causal` flag, which lets it use
  the flash kernel on a GPU (learned, sinusoidal and RoPE positions), or from a mask tensor: ALiBi's bias with
  -inf above the diagonal, or the bottom-right causal mask of queries that continue a KV cache. A mask tensor
  rules the flash kernel out (it takes none) and is read from memory for every score.
- ``flex``: PyTorch's FlexAttention (torch >= 2.5). It generates one fused kernel from two small functions: a
  `score_mod` that adjusts each score where it is computed (ALiBi: add slope_h · (j − i); no tensor to read)
  and a `BlockMask`, which records which 128 × 128 tiles of (query, key) hold any visible key, so that tiles
  above the diagonal are skipped instead of computed and thrown away. The BlockMask is built once per shape and
  reused. The kernel exists only compiled: uncompiled, flex_attention computes every score in plain torch ops,
  so on CUDA it runs through torch.compile even without --compile. On CPU (and mps) torch has no backward for it,
  and its compiled forward takes seconds per shape to build; there it runs uncompiled, for inference only: a way
  to check the kernel against SDPA, not a fast path.

`auto` is flex for ALiBi on CUDA (where it replaces the bias tensor) and sdpa everywhere else (where SDPA's own
`is_causal` already reaches the flash kernel). The choice is a runtime setting like the device, not part of the
model: the weights do not depend on it, so a checkpoint trained with one kernel resumes, samples and exports
with the other. A decoding step (one new query against the cache) keeps SDPA under either: one row of scores has
no tiles to skip, and each new cache length would need a new BlockMask.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .config import ATTENTION_CHOICES, FLEX_MIN_HEAD_DIM, GPTConfig
from .errors import ConfigError
from .positions import ALiBi, positions_of_rows

try:  # torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover - older torch: only sdpa
    _flex_module = None

_compiled_flex: Callable | None = None


class SdpaMask(NamedTuple):
    """scaled_dot_product_attention's arguments: an additive or boolean mask tensor, or the is_causal flag."""

    bias: Tensor | None
    is_causal: bool


class FlexMask(NamedTuple):
    """flex_attention's arguments: which (query, key) tiles to compute, and what to add to each score (or None)."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    score_mod: Callable | None


def flex_available() -> bool:
    return _flex_module is not None


def choose_attention(requested: str, config: GPTConfig, device: torch.device, training: bool) -> str:
    """The kernel that computes attention for --attention `requested` ("auto", "sdpa" or "flex"), or a ConfigError
    in one line when it cannot run this model here."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"unknown --attention {requested!r}; use {', '.join(ATTENTION_CHOICES)}")
    usable = [k for k in config.attention_kernels(training) if k != "flex" or _flex_runs(device, training)]
    if requested == "auto":
        return "flex" if config.positions == "alibi" and device.type == "cuda" and "flex" in usable else "sdpa"
    if requested == "flex" and "flex" not in usable:
        if not flex_available():
            why = f"FlexAttention needs torch 2.5 or newer (this is torch {torch.__version__})"
        elif not _flex_runs(device, training):
            why = f"torch has no FlexAttention backward on {device.type} (it trains on CUDA only)"
        elif config.n_embd // config.n_head < FLEX_MIN_HEAD_DIM:
            why = (f"its kernel needs a head dimension (n_embd / n_head) of at least {FLEX_MIN_HEAD_DIM}, and this "
                   f"model's is {config.n_embd // config.n_head}")
        else:
            why = f"FlexAttention has no dropout and this model trains with --dropout {config.dropout}"
        raise ConfigError(f"--attention flex cannot be used here: {why}; use --attention sdpa or auto")
    return requested


def _flex_runs(device: torch.device, training: bool) -> bool:
    """Whether this torch has FlexAttention, with a backward pass on `device` when training."""
    return flex_available() and (device.type == "cuda" or not training)


def sdpa_mask(q_len: int, start: int | Tensor, k_len: int, alibi: ALiBi | None, device: torch.device) -> SdpaMask:
    """What SDPA needs to keep each query from seeing later keys, for queries start..start+q_len-1 of k_len keys
    (start+q_len of them for an int `start`).

    SDPA's is_causal aligns the mask to the top-left corner, which is right only when there is no cached prefix;
    a single new query may see every key; anything else gets an explicit bottom-right mask. ALiBi always brings
    its own mask (bias + causal -inf). A tensor `start` (rows of a KV cache that hold different lengths, or every
    row of a compiled decoding step, whose keys span the whole cache) gets a mask per row.
    """
    if isinstance(start, Tensor):
        rows = alibi.rows(start, q_len, k_len) if alibi is not None else causal_mask_rows(start, q_len, k_len)
        return SdpaMask(rows, False)
    if alibi is not None:
        return SdpaMask(alibi(q_len, k_len), False)
    if start == 0:
        return SdpaMask(None, True)
    if q_len == 1:
        return SdpaMask(None, False)
    i = torch.arange(start, k_len, device=device)[:, None]
    return SdpaMask(torch.arange(k_len, device=device)[None, :] <= i, False)


def causal_mask_rows(start: Tensor, q_len: int, k_len: int) -> Tensor:
    """Boolean mask (B, 1, q_len, k_len) for rows of their own lengths: query i of row b sits at position
    start[b] + i and may see the keys up to it, of the k_len keys the KV cache returns (`KVCache.key_count`)."""
    i = positions_of_rows(start, q_len)[:, None, :, None]  # (B, 1, q_len, 1)
    j = torch.arange(k_len, device=start.device)
    return j <= i


class BlockMasks:
    """Causal BlockMasks for FlexAttention, one per (query length, key length, device), built once and reused:
    building one evaluates the mask at every (query, key) pair. Inside a compiled model the mask is built in the
    graph instead (a few fused element-wise ops), where a Python dict would be a side effect for torch.compile to
    guard on and recompile over."""

    def __init__(self) -> None:
        self._masks: dict[tuple, object] = {}

    def get(self, q_len: int, k_len: int, device: torch.device) -> object:
        if torch.compiler.is_compiling():
            return causal_block_mask(q_len, k_len, device)
        key = (q_len, k_len, device)
        if key not in self._masks:
            if len(self._masks) >= 8:  # training uses one shape; prompts of many lengths must not pile up
                self._masks.clear()
            self._masks[key] = causal_block_mask(q_len, k_len, device)
        return self._masks[key]


def causal_block_mask(q_len: int, k_len: int, device: torch.device) -> object:
    """The BlockMask in which query i (position k_len - q_len + i) sees keys 0 .. k_len - q_len + i."""
    offset = k_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return _flex_module.create_block_mask(causal, None, None, q_len, k_len, device=device)


def alibi_score_mod(slopes: Tensor, offset: int) -> Callable:
    """ALiBi as a score_mod: score − m_h · (i − j) for query position i = q_idx + offset and key position j, the
    bias of positions.alibi_mask computed where each score is (the mask's -inf is the BlockMask's job)."""

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx + offset - kv_idx)

    return alibi


def flex_mask(q_len: int, start: int, alibi: ALiBi | None, block_masks: BlockMasks, device: torch.device) -> FlexMask:
    """FlexAttention's arguments for queries start..start+q_len-1 of start+q_len keys."""
    score_mod = alibi_score_mod(alibi.slopes, start) if alibi is not None else None
    return FlexMask(block_masks.get(q_len, start + q_len, device), score_mod)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: FlexMask) -> Tensor:
    """FlexAttention of (B, H, T, d_head) queries, keys and values: the fused kernel on CUDA (compiled once, then
    reused; inside a compiled model it is part of the model's graph), the plain-ops version elsewhere."""
    global _compiled_flex
    flex = _flex_module.flex_attention
    if torch.compiler.is_compiling():
        return flex(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex)
        return _compiled_flex(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask)
    with warnings.catch_warnings():  # torch warns that this runs unfused: on CPU that is the point (see above)
        warnings.simplefilter("ignore", UserWarning)
        return flex(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask)
