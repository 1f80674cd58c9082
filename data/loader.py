"""Training batches: random windows of block_size + 1 tokens, reproducible, resumable, split between ranks.

Rank r of world_size draws only from its own contiguous part of the tokens, [r * n // world_size,
(r + 1) * n // world_size), so no two ranks ever read the same token. Batch k of a rank is drawn by a generator
seeded with (seed, rank, k): the whole state of a loader is the number of batches it has handed out. That makes
resume exact and trivial (the trainer keeps every loader's state in its checkpoint; they are all alike).

To make world_size x grad_accum interchangeable (2 processes x 1 micro-batch reading the same data as
1 process x 2 micro-batches), give each micro-step its own loader: rank = process_rank * grad_accum + micro,
world_size = processes * grad_accum.
"""

from __future__ import annotations

import numpy as np

from data.errors import DataError

STATE_VERSION = 1


class BatchLoader:
    """Hands out (x, y) int64 arrays of shape (batch_size, block_size), y being x shifted by one token."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block size and batch size must be at least 1, got {block_size} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got rank {rank} of world size {world_size}")
        if seed < 0:
            raise DataError(f"the seed must be a non-negative integer, got {seed}")
        lo, hi = rank * len(tokens) // world_size, (rank + 1) * len(tokens) // world_size
        if hi - lo < block_size + 1:
            per_rank = f" ({world_size} ranks share {len(tokens)})" if world_size > 1 else ""
            raise DataError(f"corpus too small for block size {block_size}: have {hi - lo} tokens{per_rank}, "
                            f"need at least {block_size + 1}; use a smaller --block-size or more data")
        self.tokens = tokens[lo:hi]
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank = seed, rank
        self.batches = 0  # batches handed out so far: the loader's whole state
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch of random windows; the same sequence for the same (tokens, sizes, seed, rank)."""
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)
        self.batches += 1
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def state_dict(self) -> dict:
        """JSON-able position: load it into a loader built with the same arguments to continue exactly here."""
        return {"version": STATE_VERSION, "seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (from any rank: the position is the same on all of them)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"not a BatchLoader state of version {STATE_VERSION}: {state!r:.80}")
        if state.get("seed") != self.seed:
            raise DataError(f"the data position was saved with seed {state.get('seed')}, this run has seed "
                            f"{self.seed}; resume with the same --seed")
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise DataError(f"invalid data position {batches!r} in the saved loader state")
        self.batches = batches
