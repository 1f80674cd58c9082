"""Four ways to tell a decoder where each token sits.

Attention by itself is blind to order, so the model needs position information from somewhere:

- ``learned``: a trainable table of one vector per position, added to the token embeddings (GPT-2). It only
  knows the positions it was trained on, so it refuses sequences longer than ``block_size``.
- ``sinusoidal``: fixed sines and cosines of the position (Vaswani et al., 2017), added to the token embeddings.
  A closed form, so it exists for any position.
- ``alibi``: nothing is added to the embeddings; instead each head's attention score for query i and key j is
  lowered by ``m_h * (i - j)``, a penalty that grows with distance (Press et al., 2022). Because it speaks only
  of distances, a model trained on short sequences keeps working on longer ones.
- ``rope``: nothing is added to the embeddings either; each head's queries and keys are *rotated* by an angle
  proportional to their position (Su et al., 2021). A rotation by t·θ of the query and by s·θ of the key leaves
  their dot product depending only on (t - s)·θ, so attention sees relative positions, from absolute rotations.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError


class LearnedPositions(nn.Module):
    """A (block_size, n_embd) table; row t is added to the embedding of the token at position t."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.table = nn.Embedding(block_size, n_embd)

    def forward(self, start: int | Tensor, length: int) -> Tensor:
        """Rows (length, n_embd) of positions start..start+length-1; with a tensor of starts (one per row of a
        batch), (B, length, n_embd)."""
        if isinstance(start, Tensor):
            if not torch.compiler.is_compiling():  # compiled (a CUDA-graph decoding step) it would wait for the GPU
                self._check(int(start.max()) + length)
            return self.table(positions_of_rows(start, length))
        self._check(start + length)
        return self.table.weight[start:start + length]  # a slice, not a lookup: no index tensor to build

    def _check(self, end: int) -> None:
        block_size = self.table.num_embeddings
        if end > block_size:
            raise ConfigError(
                f"sequence reaches position {end - 1} but learned positions cover only 0..{block_size - 1} "
                f"(block_size={block_size}); crop the input to {block_size} tokens or use positions='sinusoidal' "
                "or 'alibi', which handle any length"
            )


def sinusoidal_table(length: int, dim: int, start: int = 0) -> Tensor:
    """PE[t, 2k] = sin(t / 10000^(2k/d)), PE[t, 2k+1] = cos(t / 10000^(2k/d)) for t in [start, start + length).

    Computed in float64 and rounded once, so that far positions (large t) are as exact as float32 allows.
    """
    return sinusoids(torch.arange(start, start + length), dim)


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """The rows of the sinusoidal table (see sinusoidal_table) for any positions: shape positions.shape + (dim,)."""
    t = positions.to(torch.float64)[..., None]
    inverse_wavelength = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=t.device) / dim)
    angles = t * inverse_wavelength
    table = torch.empty(*positions.shape, dim, dtype=torch.float64, device=t.device)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles)
    return table.float()


def positions_of_rows(start: Tensor, length: int) -> Tensor:
    """(B, length) positions start[b] .. start[b] + length - 1: the rows of a batch whose lengths differ."""
    return start[:, None] + torch.arange(length, device=start.device)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoids times `scale`: the first block_size rows are precomputed, rows beyond are computed when
    asked for.

    Why a scale: the table's entries are of size 1, while GPT-2 initialises token embeddings with std 0.02. Added
    as they are, the positions drown the tokens (after the first LayerNorm a token is a small ripple on a position
    signal), and training stalls far above a learned-position model. Scaling the table to the embeddings' size
    puts the two on an equal footing (measured: 5.76 vs 7.03 val loss after 400 steps of the baby config; learned
    positions reach 5.80). Vaswani et al. instead multiply the embeddings by sqrt(n_embd), which helps less here.
    """

    def __init__(self, block_size: int, n_embd: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        # Not persistent: it is a function of the config, so it has no business in a checkpoint.
        self.register_buffer("table", scale * sinusoidal_table(block_size, n_embd), persistent=False)

    def forward(self, start: int | Tensor, length: int) -> Tensor:
        """Like LearnedPositions.forward: (length, n_embd), or (B, length, n_embd) for a tensor of starts."""
        if isinstance(start, Tensor):
            positions = positions_of_rows(start, length)
            if not torch.compiler.is_compiling() and int(positions.max()) < self.table.shape[0]:
                return self.table[positions]
            # Past the table, or compiled: there the closed form's few fused ops replace a check that would wait
            # for the GPU (a CUDA-graph decoding step takes no decision on values).
            return (self.scale * sinusoids(positions, self.table.shape[1])).to(self.table)
        end = start + length
        if end <= self.table.shape[0]:
            return self.table[start:end]
        return (self.scale * sinusoidal_table(length, self.table.shape[1], start)).to(self.table)


def alibi_slopes(n_head: int) -> Tensor:
    """The per-head slopes m_h of ALiBi (Press et al., 2022, section 3).

    For H a power of two: the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8). For other H the paper takes
    the H' = 2^floor(log2 H) slopes of the nearest smaller power of two, then fills the remaining H - H' heads
    with every other slope of the 2H'-head sequence (the odd-numbered ones, which lie between the first set).
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 2 ** int(math.log2(n_head))
    slopes = geometric(base) + geometric(2 * base)[0::2][: n_head - base]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_mask(slopes: Tensor, q_len: int, k_len: int) -> Tensor:
    """Additive attention mask (H, q_len, k_len): ALiBi's -m_h * (i - j) where j <= i, and -inf where j > i.

    The queries are the *last* q_len of the k_len positions: with a KV cache a single new token (q_len = 1) is
    position k_len - 1 and attends to every cached key. Causal masking and the distance bias are one tensor, so
    the attention kernel applies both in a single add.
    """
    i = torch.arange(k_len - q_len, k_len, device=slopes.device)[:, None]
    j = torch.arange(k_len, device=slopes.device)[None, :]
    distance = (i - j).to(slopes.dtype)
    bias = -slopes[:, None, None] * distance
    return bias.masked_fill(j > i, float("-inf"))


def alibi_mask_rows(slopes: Tensor, start: Tensor, q_len: int, k_len: int) -> Tensor:
    """alibi_mask for rows of their own lengths: (B, H, q_len, k_len), query i of row b at position start[b] + i,
    keys 0 .. k_len-1 (the KV cache's: see KVCache.key_count); keys past a row's own query are -inf."""
    i = positions_of_rows(start, q_len)[:, None, :, None]  # (B, 1, q_len, 1)
    j = torch.arange(k_len, device=start.device)
    bias = -slopes[:, None, None].to(start.device) * (i - j).to(slopes.dtype)  # (B, H, q_len, K)
    return bias.masked_fill(j > i, float("-inf"))


class ALiBi(nn.Module):
    """Holds the slopes and a small cache of masks, built once per (length, dtype, device) and reused."""

    max_cached = 8  # training uses one length; generation a couple; this bounds memory if lengths keep changing
    # Only masks up to a training context's size are kept (1024 x 1024 scores, 4 MB a head in float32); a longer
    # prompt's is built and dropped (8192 x 8192 with 12 heads would hold 3.2 GB for the life of the model).
    max_cached_scores = 1024 * 1024

    def __init__(self, n_head: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)
        self._masks: dict[tuple, Tensor] = {}

    def forward(self, q_len: int, k_len: int) -> Tensor:
        """The (1, H, q_len, k_len) mask for SDPA (the leading 1 broadcasts over the batch)."""
        if torch.compiler.is_compiling():
            # Inside a compiled model the mask is a few fused element-wise ops of the graph; the cache below
            # would be a Python side effect (and an inference-mode query) that splits the graph.
            return alibi_mask(self.slopes, q_len, k_len)[None]
        # A mask made under inference_mode (generation) cannot take part in training's autograd: keep them apart.
        key = (q_len, k_len, self.slopes.dtype, self.slopes.device, torch.is_inference_mode_enabled())
        mask = self._masks.get(key)
        if mask is None:
            mask = alibi_mask(self.slopes, q_len, k_len)[None]
            # Not kept: a generation step's row (cheaper to build than to keep one per length), a long prompt's mask.
            if q_len > 1 and q_len * k_len <= self.max_cached_scores:
                if len(self._masks) >= self.max_cached:
                    self._masks.clear()
                self._masks[key] = mask
        return mask

    def rows(self, start: Tensor, q_len: int, k_len: int) -> Tensor:
        """The (B, H, q_len, k_len) mask of rows whose queries start at their own positions (see alibi_mask_rows)."""
        return alibi_mask_rows(self.slopes, start, q_len, k_len)


class RotaryPositions(nn.Module):
    """RoPE's cosines and sines for each position: those of the sinusoidal table, one angle per pair of channels.

    A query or key of head dimension d is cut into d/2 pairs, pair k being channels (k, k + d/2) (the "halves"
    layout of GPT-NeoX and LLaMA in Hugging Face; the paper pairs neighbours, which differs only by a fixed
    permutation of the channels, which the projection weights absorb). Pair k at position t turns by the angle
    t·θ_k with θ_k = 10000^(-2k/d): exactly the angles of `sinusoidal_table`, so the table is reused. Rows up to
    block_size are precomputed; later positions are computed when asked for, so RoPE runs past block_size.
    """

    def __init__(self, block_size: int, head_dim: int) -> None:
        super().__init__()
        table = sinusoidal_table(block_size, head_dim)  # columns 2k: sin(t·θ_k), 2k + 1: cos(t·θ_k)
        self.register_buffer("cos", table[:, 1::2].contiguous(), persistent=False)
        self.register_buffer("sin", table[:, 0::2].contiguous(), persistent=False)

    def forward(self, start: int | Tensor, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin, each (length, d/2), of positions start .. start + length - 1; for a tensor of starts (one per
        row), each (B, 1, length, d/2), which broadcasts over the heads."""
        if isinstance(start, Tensor):
            positions = positions_of_rows(start, length)
            if not torch.compiler.is_compiling() and int(positions.max()) < self.cos.shape[0]:
                return self.cos[positions][:, None], self.sin[positions][:, None]
            # Past the table, or compiled (see SinusoidalPositions.forward): the closed form.
            table = sinusoids(positions, 2 * self.cos.shape[1]).to(self.cos)
            return table[..., 1::2][:, None], table[..., 0::2][:, None]
        end = start + length
        if end <= self.cos.shape[0]:
            return self.cos[start:end], self.sin[start:end]
        table = sinusoidal_table(length, 2 * self.cos.shape[1], start).to(self.cos)
        return table[:, 1::2], table[:, 0::2]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn every pair (x1, x2) = (x[..., k], x[..., k + d/2]) of x (..., T, d) by its angle: a 2-D rotation,
    (x1, x2) -> (x1·cos - x2·sin, x1·sin + x2·cos), with cos and sin (T, d/2) broadcast over the leading axes."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast x is half precision; keep it so
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
