"""data.loader.BatchLoader: windows, determinism, exact resume, disjoint ranks, too-small corpora."""

import json

import numpy as np
import pytest

from data import DataError
from data.loader import BatchLoader


def take(loader: BatchLoader, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_windows_and_targets_are_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)  # a token's value is its position: windows show where they start
    x, y = BatchLoader(tokens, block_size=16, batch_size=8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    for row_x, row_y in zip(x, y):
        start = row_x[0]
        assert np.array_equal(row_x, np.arange(start, start + 16))
        assert np.array_equal(row_y, np.arange(start + 1, start + 17))


def test_same_seed_same_batches_and_other_seed_other_batches():
    tokens = np.random.default_rng(1).integers(0, 300, size=5000).astype(np.uint16)
    a = take(BatchLoader(tokens, 32, 4, seed=7), 5)
    b = take(BatchLoader(tokens, 32, 4, seed=7), 5)
    c = take(BatchLoader(tokens, 32, 4, seed=8), 5)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    assert not np.array_equal(a[0][0], a[1][0])  # successive batches differ


def test_resume_from_state_dict_continues_exactly():
    tokens = np.arange(10_000, dtype=np.uint32)
    straight = take(BatchLoader(tokens, 64, 6, seed=3), 10)
    first = BatchLoader(tokens, 64, 6, seed=3)
    take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    resumed = BatchLoader(tokens, 64, 6, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(straight[4:], take(resumed, 6)):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)


def test_state_refuses_another_seed_or_garbage():
    tokens = np.arange(100)
    loader = BatchLoader(tokens, 8, 2, seed=1)
    with pytest.raises(DataError, match="seed 2.*same --seed"):
        loader.load_state_dict(BatchLoader(tokens, 8, 2, seed=2).state_dict())
    with pytest.raises(DataError, match="not a BatchLoader state"):
        loader.load_state_dict({"step": 3})
    with pytest.raises(DataError, match="invalid data position"):
        loader.load_state_dict({**loader.state_dict(), "batches": -1})


def test_ranks_read_disjoint_parts_and_share_one_state():
    n, world = 10_001, 3
    tokens = np.arange(n, dtype=np.uint16)
    seen = []
    for rank in range(world):
        loader = BatchLoader(tokens, 32, 16, seed=5, rank=rank, world_size=world)
        values = np.concatenate([np.concatenate([x.ravel(), y.ravel()]) for x, y in take(loader, 50)])
        lo, hi = rank * n // world, (rank + 1) * n // world
        assert values.min() >= lo and values.max() < hi
        assert values.min() < lo + 200 and values.max() > hi - 200  # and they cover their whole part
        seen.append(set(values.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # rank 0's saved state resumes rank 1 at the same position
    rank0 = BatchLoader(tokens, 32, 16, seed=5, rank=0, world_size=world)
    take(rank0, 3)
    rank1 = BatchLoader(tokens, 32, 16, seed=5, rank=1, world_size=world)
    rank1.load_state_dict(rank0.state_dict())
    expected = take(BatchLoader(tokens, 32, 16, seed=5, rank=1, world_size=world), 4)[3]
    assert np.array_equal(rank1.next_batch()[0], expected[0])


def test_memmap_tokens(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = BatchLoader(tokens, 10, 3, seed=0).next_batch()
    assert np.array_equal(x + 1, y)


def test_too_small_corpus_says_what_to_do():
    with pytest.raises(DataError, match=r"corpus too small for block size 64: have 64 tokens.*smaller "
                                        r"--block-size or more data"):
        BatchLoader(np.arange(64), block_size=64, batch_size=2, seed=0)
    x, y = BatchLoader(np.arange(65), block_size=64, batch_size=2, seed=0).next_batch()  # exactly one window
    assert np.array_equal(x[0], np.arange(64)) and np.array_equal(y[1], np.arange(1, 65))
    with pytest.raises(DataError, match="have 50 tokens \\(2 ranks share 100\\)"):
        BatchLoader(np.arange(100), block_size=64, batch_size=2, seed=0, rank=1, world_size=2)
    with pytest.raises(DataError, match="rank must be"):
        BatchLoader(np.arange(100), block_size=4, batch_size=2, seed=0, rank=2, world_size=2)
