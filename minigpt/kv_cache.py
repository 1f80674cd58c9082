"""The KV cache: the keys and values of past positions, kept so that each new token costs one position of work.

GPT.new_cache makes one and GPT.hidden_states fills it; the engine (engine.py) adds and removes its rows as
sequences come and go, and the compiled decoding step (static_step.py) writes into its buffer in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError
from .positions import positions_of_rows


class KVCache:
    """Keys and values of every layer for the positions generated so far.

    During generation the keys and values of past positions never change (for sinusoidal, ALiBi and RoPE models,
    and for learned positions until the window slides), so each new token only computes its own and attends to the
    stored ones: one position of work per token instead of a re-run over the whole context. The buffers are
    allocated once for `capacity` positions, so appending writes one slot rather than copying the history.

    Each row keeps its own length. When every row holds as many positions (one prompt, or a batch of equal
    prompts) `length` is one int and the new keys go into one slice of every row. When rows differ (the engine's
    batches: requests that joined at different times) `length` is a tensor, each row's keys go to their own
    position, and the attention masks keep every row to its own keys (`attention.sdpa_mask`). Rows can be added
    from another cache and removed (`set_row`, `remove_row`), so that a batch of sequences can change while it runs.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, capacity: int, head_dim: int,
                 device: torch.device | str | None = None) -> None:
        # Keys and values side by side, so that one copy stores both. Allocated on first use, in the dtype the
        # keys actually have (half precision under autocast) and on their device, and zeroed: a row shorter than
        # the longest is given keys past its own length, masked out, but attention still multiplies their values
        # by a zero weight, and uninitialised memory may hold NaN (0 x NaN = NaN).
        self.shape = (n_layer, 2, batch_size, n_head, capacity, head_dim)
        self.kv: Tensor | None = None
        self.capacity = capacity
        self.device = torch.device(device or "cpu")
        self._lengths = [0] * batch_size  # positions stored in each row in use, as host ints: no device sync
        self._start: int | Tensor | None = None  # `length`, worked out once per change of the lengths

    @property
    def lengths(self) -> tuple[int, ...]:
        """Positions stored in each row in use."""
        return tuple(self._lengths)

    @property
    def length(self) -> int | Tensor:
        """Where the next positions go: one int when every row holds as many positions, else a (rows,) tensor."""
        if self._start is None:
            first = self._lengths[0] if self._lengths else 0
            if all(n == first for n in self._lengths):
                self._start = first
            else:
                self._start = torch.tensor(self._lengths, device=self.device)
        return self._start

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys and values (each B, H, T, d_head); return all keys and values so far.

        With rows of different lengths the keys returned reach the longest row; the masks hide the rest.
        """
        rows, T = k.shape[0], k.shape[2]
        if rows != len(self._lengths):
            raise ConfigError(f"KV cache has {len(self._lengths)} rows in use; got keys for {rows}")
        start = self.length
        end = (start if isinstance(start, int) else max(self._lengths)) + T
        if end > self.capacity:
            raise ConfigError(f"KV cache holds {self.capacity} positions; cannot add up to position {end}")
        if self.kv is None:
            self.kv = k.new_zeros(self.shape)
            self.device = k.device
        stored = self.kv[layer, :, :rows]
        if isinstance(start, int):
            stored[0, :, :, start:end] = k
            stored[1, :, :, start:end] = v
        else:
            self.write_rows(stored[0], stored[1], start, k, v)
        return stored[0, :, :, :end], stored[1, :, :, :end]

    @staticmethod
    def write_rows(keys: Tensor, values: Tensor, start: Tensor, k: Tensor, v: Tensor) -> None:
        """Write the keys and values (B, H, T, d_head) of each row b at its own positions start[b] .. start[b]+T-1
        of `keys` and `values` (B, H, capacity, d_head): (B, T) indices, written as (B, T, H, d_head)."""
        positions = positions_of_rows(start, k.shape[2])
        row = torch.arange(k.shape[0], device=start.device)[:, None]
        keys[row, :, positions] = k.transpose(1, 2)
        values[row, :, positions] = v.transpose(1, 2)

    def key_count(self, new: int) -> int:
        """How many keys `update` returns after `new` more positions: the longest row's (masks hide the rest)."""
        return max(self._lengths, default=0) + new

    def advance(self, n: int) -> None:
        """Count n more positions in every row (GPT.hidden_states calls it after the last layer)."""
        self._lengths = [length + n for length in self._lengths]
        self._start = None

    def reset(self, rows: int | None = None) -> None:
        """Forget every position (the buffers are reused); `rows` sets how many rows are in use (0: an empty batch
        that `set_row` fills)."""
        self._lengths = [0] * (len(self._lengths) if rows is None else rows)
        self._start = None

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions in every row, keeping what is stored."""
        if capacity <= self.capacity:
            return
        self.shape = self.shape[:4] + (capacity,) + self.shape[5:]
        if self.kv is not None:
            used = max(self._lengths, default=0)
            grown = self.kv.new_zeros(self.shape)
            grown[..., :used, :] = self.kv[..., :used, :]
            self.kv = grown
        self.capacity = capacity

    def set_row(self, row: int, source: "KVCache", source_row: int, length: int | None = None) -> None:
        """Copy the first `length` positions (default: all) of row `source_row` of another cache (a prefill's)
        into row `row`; the row after the last in use adds one."""
        if not 0 <= row <= len(self._lengths) or row >= self.shape[2]:
            raise ConfigError(f"row {row} is outside the {len(self._lengths)} rows in use of {self.shape[2]}")
        length = source._lengths[source_row] if length is None else length
        if length > self.capacity:
            raise ConfigError(f"KV cache holds {self.capacity} positions; the row has {length}")
        if self.kv is None:
            self.kv = source.kv.new_zeros(self.shape)
            self.device = source.kv.device
        self.kv[:, :, row, :, :length] = source.kv[:, :, source_row, :, :length]
        if row == len(self._lengths):
            self._lengths.append(length)
        else:
            self._lengths[row] = length
        self._start = None

    def remove_row(self, row: int) -> None:
        """Stop using row `row`: the last row moves into its place (so the rows in use stay the first ones)."""
        last = len(self._lengths) - 1
        if row != last:
            length = self._lengths[last]
            self.kv[:, :, row, :, :length] = self.kv[:, :, last, :, :length]
            self._lengths[row] = length
        self._lengths.pop()
        self._start = None
