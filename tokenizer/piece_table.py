"""The distinct pieces of a corpus as a few flat numpy arrays, and one BPE merge applied to all of them at once.

A corpus of hundreds of megabytes has about a million distinct pieces. Held as a Python list per piece and
rewritten piece by piece, each merge costs microseconds of interpreter time per piece it touches (8 million
touches for 16 K merges on 435 MB); here a merge is a few dozen numpy operations on the positions where its pair
occurs, whatever their number, and the table weighs 16 bytes per symbol (plus 8 per recorded pair occurrence).

**Layout.** Every piece's symbols are laid out one after the other, with a sentinel (-1) before each piece and one
at the end, so a pair never spans two pieces::

    sym:    -1  t  h  e  -1  a  -1  i  n  -1        (symbol ids; merged symbols get ids >= 256)
    weight:  .  5  5  5   .  2   .  7  7   .        (how often the piece occurs in the corpus)

A merge writes the merged symbol over its left half and marks the right half dead (-2); ``nxt`` and ``prv`` link
each live slot to its live neighbours, so the dead slots cost nothing later (a piece of a million "a" shrinks by
half at each merge, and every merge stays linear in the number of joins).

**Where each pair occurs.** Every occurrence of a pair is recorded once, when it appears, by the position of its
left symbol: the initial pairs ``(a, y)`` in ``after[a]``, the pairs a merge creates to the left of its new symbol
``m``, ``(x, m)``, in ``before[m]``, and those to its right, ``(m, y)``, in ``after[m]``. Each record is a chunk of
positions sorted by the other symbol (``x`` or ``y``), so the positions of ``(a, b)`` are a binary search in each
chunk of ``after[a]`` and ``before[b]``. A record goes stale when its pair changes later (a neighbour merged); merging
re-checks every position, so stale ones are skipped, never wrong. An occurrence cannot be recorded twice: the
bytes of a position's pair only ever grow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np

DEAD = -2  # the right half of a join, now part of the slot on its left
EDGE = -1  # the sentinel before each piece (and after the last)

# A pair (left, right) of symbol ids is the int left * PAIR + right (ids stay below 2**31).
PAIR = 1 << 32


class PieceTable:
    """Distinct pieces (symbol ids, with their corpus counts) with a positional index of their adjacent pairs."""

    def __init__(self, symbols: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> None:
        """``symbols``: every piece's symbol ids concatenated; ``lengths`` and ``counts``: per piece."""
        lengths = np.asarray(lengths, np.int64)
        size = len(symbols) + len(lengths) + 1
        self.pos_type = np.int32 if size < 2**31 else np.int64
        edges = np.concatenate(([0], np.cumsum(lengths + 1)))  # the sentinel before each piece, and the last one
        self.sym = np.full(size, EDGE, np.int32)
        is_symbol = np.ones(size, bool)
        is_symbol[edges] = False
        self.sym[is_symbol] = symbols
        counts = np.asarray(counts, np.int64)
        weight_type = np.int32 if counts.max(initial=0) < 2**31 else np.int64  # sums are taken in int64
        self.weight = np.zeros(size, weight_type)
        self.weight[is_symbol] = np.repeat(counts.astype(weight_type), lengths)
        self.nxt = np.arange(1, size + 1, dtype=self.pos_type)
        self.nxt[-1] = size - 1
        self.prv = np.arange(-1, size - 1, dtype=self.pos_type)
        self.prv[0] = 0
        self.after: defaultdict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self.before: defaultdict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)

    def index_pairs(self) -> dict[int, int]:
        """Record where every adjacent pair occurs and return its count (weighted by piece count); call once, first.

        The counts are keyed by ``left * PAIR + right``."""
        sym = self.sym
        pos = np.flatnonzero((sym[:-1] >= 0) & (sym[1:] >= 0)).astype(self.pos_type)
        if not len(pos):
            return {}
        span = int(sym.max()) + 1
        key_type = np.uint16 if span * span <= 1 << 16 else np.int64  # bytes: 256 x 256 keys, sorted by radix
        keys = sym[pos].astype(key_type)
        keys *= span
        keys += sym[pos + 1].astype(key_type)  # ordered as (left, right)
        order = np.argsort(keys, kind="stable")
        keys, pos = keys[order], pos[order]
        del order
        starts = _group_starts(keys)
        totals = np.add.reduceat(self.weight[pos], starts, dtype=np.int64)
        lefts, rights = np.divmod(keys[starts].astype(np.int64), span)
        counts = dict(zip((lefts * PAIR + rights).tolist(), totals.tolist()))
        lefts = keys // span
        rights = (keys % span).astype(np.int32)
        del keys
        bounds = np.append(_group_starts(lefts), len(lefts))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            self.after[int(lefts[lo])].append((rights[lo:hi], pos[lo:hi]))
        return counts

    def positions(self, left: int, right: int) -> np.ndarray:
        """Every recorded position of the pair (left, right): current ones and stale ones."""
        after, before = self.after.get(left, ()), self.before.get(right, ())
        left, right = np.int32(left), np.int32(right)  # a Python int would make numpy convert the whole chunk
        found = [ps[other.searchsorted(right):other.searchsorted(right, "right")] for other, ps in after]
        found += [ps[other.searchsorted(left):other.searchsorted(left, "right")] for other, ps in before]
        return np.concatenate(found) if found else np.zeros(0, self.pos_type)

    def merge(self, a: int, b: int, m: int) -> tuple[Iterator[tuple[int, int]], Iterator[tuple[int, int]]]:
        """Replace every occurrence of the pair (a, b) by the symbol m, left to right within a piece.

        Returns how the counts of the neighbouring pairs changed: ``(gained, lost)``, each ``(pair key, amount)``
        with the key ``left * PAIR + right``. Around a join "x a b y" -> "x m y", (x, a) and (b, y) lose the
        piece's count and (x, m), (m, y) gain it; of two adjacent joins "x a b a b y" -> "x m m y" the pair (b, a)
        between them is lost once and (m, m) gained once. The count of (a, b) itself is left to the caller (it
        is 0 now).
        """
        sym, nxt, prv = self.sym, self.nxt, self.prv
        pos = self.positions(a, b)
        q = nxt[pos]  # the right halves
        current = (sym[pos] == a) & (sym[q] == b)  # drop stale records
        pos, q = pos[current], q[current]
        if a == b:  # in a run "a a a a a" the joins are the 1st and 3rd pairs (left to right), not all four
            order = np.argsort(pos)
            pos, q = pos[order], q[order]
            run_start = prv[pos] != np.concatenate(([-1], pos[:-1]))
            index = np.arange(len(pos))
            first = (index - np.maximum.accumulate(np.where(run_start, index, 0))) % 2 == 0
            pos, q = pos[first], q[first]
        left, right = prv[pos], nxt[q]
        x, y = sym[left], sym[right]
        w = self.weight[pos]
        # A left neighbour that is the right half of a join just before (adjacent joins) is counted with that join;
        # a right neighbour that is the left half of the next join becomes m. Both are rare: test cheaply first.
        has_left = x >= 0
        joined = x == b
        if joined.any():
            has_left &= ~(joined & (sym[prv[left]] == a))
        new_y = y
        joined = y == a
        next_joined = joined.any()
        if next_joined:
            new_y = np.where(joined & (sym[nxt[right]] == b), m, y)
        has_right = y >= 0
        sym[pos] = m
        sym[q] = DEAD
        nxt[pos] = right
        prv[right] = pos

        xs, x_totals = self._record(self.before[m], x[has_left], left[has_left], w[has_left])
        y, new_y, pos, w = y[has_right], new_y[has_right], pos[has_right], w[has_right]
        new_ys, new_y_totals = self._record(self.after[m], new_y, pos, w)
        ys, y_totals = _group_sums(y, w) if next_joined else (new_ys, new_y_totals)
        gained = zip(np.concatenate((xs * PAIR + m, m * PAIR + new_ys)).tolist(),
                     np.concatenate((x_totals, new_y_totals)).tolist())
        lost = zip(np.concatenate((xs * PAIR + a, b * PAIR + ys)).tolist(),
                   np.concatenate((x_totals, y_totals)).tolist())
        return gained, lost

    @staticmethod
    def _record(chunks: list, other: np.ndarray, pos: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add a chunk of new pair positions sorted by the other symbol; return :func:`_group_sums` of it."""
        order = _argsort_ids(other)
        other = other[order]
        if len(other):
            chunks.append((other, pos[order]))
        return _sum_sorted_groups(other, w[order])


def _argsort_ids(values: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative ids; as 16-bit numbers when they fit, which numpy sorts by radix (10x faster)."""
    if len(values) and values.max() < 1 << 16:
        values = values.astype(np.uint16)
    return np.argsort(values, kind="stable")


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new value starts in a sorted non-empty array."""
    return np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))


def _group_sums(values: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct value (as int64) and the sum of its weights."""
    order = _argsort_ids(values)
    return _sum_sorted_groups(values[order], w[order])


def _sum_sorted_groups(values: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(values):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = _group_starts(values)
    return values[starts].astype(np.int64), np.add.reduceat(w, starts, dtype=np.int64)
