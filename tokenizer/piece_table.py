"""The distinct pieces of a corpus as a few flat numpy arrays, and one BPE merge applied to all of them at once.

A corpus of hundreds of megabytes has about a million distinct pieces. Held as a Python list per piece and
rewritten piece by piece, each merge costs microseconds of interpreter time per piece it touches (8 million
touches for 16 K merges on 435 MB); here a merge is a few dozen numpy operations on the positions where its pair
occurs, whatever their number, and the table weighs 20 bytes per symbol.

**Layout.** Every piece's symbols are laid out one after the other, with a sentinel (-1) before each piece and one
at the end, so a pair never spans two pieces::

    sym:    -1  t  h  e  -1  a  -1  i  n  -1        (symbol ids; merged symbols get ids >= 256)
    weight:  .  5  5  5   .  2   .  7  7   .        (how often the piece occurs in the corpus)

A merge writes the merged symbol over its left half and marks the right half dead (-2); ``nxt`` and ``prv`` link
each live slot to its live neighbours, so the dead slots cost nothing later (a piece of a million "a" shrinks by
half at each merge, and every merge stays linear in the number of joins).

**Where each pair occurs.** Every occurrence of a pair is recorded once, when it appears, by its position: the
initial pairs in ``after[left]``, the pairs a merge creates to the left of its new symbol ``m`` in ``before[m]``
(the pair ``(x, m)`` under ``x``) and those to its right in ``after[m]`` (the pair ``(m, y)`` under ``y``). Each
record is a chunk sorted by the other symbol, so the positions of ``(a, b)`` are a binary search in the chunks of
``after[a]`` and ``before[b]``. A record goes stale when its pair changes later (a neighbour merged); merging
re-checks every position, so stale ones are skipped, never wrong. An occurrence cannot be recorded twice: the
bytes of a position's pair only ever grow.
"""

from __future__ import annotations

from collections import defaultdict

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
        self.weight = np.zeros(size, np.int64)
        self.weight[is_symbol] = np.repeat(np.asarray(counts, np.int64), lengths)
        self.nxt = np.arange(1, size + 1, dtype=self.pos_type)
        self.nxt[-1] = size - 1
        self.prv = np.arange(-1, size - 1, dtype=self.pos_type)
        self.prv[0] = 0
        self.after: defaultdict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self.before: defaultdict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)

    def pair_counts(self) -> dict[int, int]:
        """Count every adjacent pair (weighted by piece count) and index where each occurs; call once, first."""
        sym = self.sym
        pos = np.flatnonzero((sym[:-1] >= 0) & (sym[1:] >= 0)).astype(self.pos_type)
        if not len(pos):
            return {}
        lefts, rights = sym[pos], sym[pos + 1]
        keys = lefts.astype(np.int64) * (int(sym.max()) + 1) + rights  # ordered as (left, right)
        order = _argsort_ids(keys)
        keys, lefts, rights, pos = keys[order], lefts[order], rights[order], pos[order]
        del order
        starts = _group_starts(keys)
        totals = np.add.reduceat(self.weight[pos], starts)
        counts = dict(zip((lefts[starts].astype(np.int64) * PAIR + rights[starts]).tolist(), totals.tolist()))
        del keys
        bounds = np.append(_group_starts(lefts), len(lefts))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            self.after[int(lefts[lo])].append((rights[lo:hi], pos[lo:hi]))
        return counts

    def positions(self, left: int, right: int) -> np.ndarray:
        """Every recorded position of the pair (left, right): current ones and stale ones."""
        left, right = np.int32(left), np.int32(right)  # a Python int would make numpy convert the whole chunk
        found = [ps[other.searchsorted(right):other.searchsorted(right, "right")]
                 for other, ps in self.after.get(int(left), ())]
        found += [ps[other.searchsorted(left):other.searchsorted(left, "right")]
                  for other, ps in self.before.get(int(right), ())]
        return np.concatenate(found) if found else np.zeros(0, self.pos_type)

    def merge(self, a: int, b: int, m: int) -> list[tuple[int, int]]:
        """Replace every occurrence of the pair (a, b) by the symbol m, left to right within a piece.

        Returns how the count of each neighbouring pair changed, as ``(pair key, delta)`` with the key
        ``left * PAIR + right``. Around a join "x a b y" -> "x m y", (x, a) and (b, y) lose the piece's count
        and (x, m), (m, y) gain it; of two adjacent joins "x a b a b y" -> "x m m y" the pair (b, a) between
        them is lost once and (m, m) gained once. The count of (a, b) itself is left to the caller (it is 0).
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
        # The left neighbour is the right half of a join just before (adjacent joins): counted with that join.
        has_left = (x >= 0) & ~((x == b) & (sym[prv[left]] == a))
        has_right = y >= 0
        new_y = np.where((y == a) & (sym[nxt[right]] == b), m, y)  # the right neighbour is joined too
        sym[pos] = m
        sym[q] = DEAD
        nxt[pos] = right
        prv[right] = pos

        x, left, wl = x[has_left], left[has_left], w[has_left]
        y, new_y, pos, wr = y[has_right], new_y[has_right], pos[has_right], w[has_right]
        deltas: list[tuple[int, int]] = []
        xs, totals = self._record(self.before[m], x, left, wl)
        deltas += [(v * PAIR + a, -t) for v, t in zip(xs, totals)]
        deltas += [(v * PAIR + m, t) for v, t in zip(xs, totals)]
        ys, totals = self._record(self.after[m], new_y, pos, wr)
        deltas += [(m * PAIR + v, t) for v, t in zip(ys, totals)]
        if (new_y != y).any():  # some right neighbours were joined: the lost pairs differ from the gained ones
            ys, totals = _group_sums(y, wr)
        deltas += [(b * PAIR + v, -t) for v, t in zip(ys, totals)]
        return deltas

    @staticmethod
    def _record(chunks: list, other: np.ndarray, pos: np.ndarray, w: np.ndarray) -> tuple[list[int], list[int]]:
        """Add a chunk of new pair positions sorted by the other symbol; return per other symbol the summed weight."""
        if not len(other):
            return [], []
        order = _argsort_ids(other)
        other, pos, w = other[order], pos[order], w[order]
        chunks.append((other, pos))
        starts = _group_starts(other)
        return other[starts].tolist(), np.add.reduceat(w, starts).tolist()


def _argsort_ids(values: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative ids; as 16-bit numbers when they fit, which numpy sorts by radix (10x faster)."""
    if values.max() < 1 << 16:
        values = values.astype(np.uint16)
    return np.argsort(values, kind="stable")


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new value starts in a sorted non-empty array."""
    return np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))


def _group_sums(values: np.ndarray, w: np.ndarray) -> tuple[list[int], list[int]]:
    order = _argsort_ids(values)
    values, w = values[order], w[order]
    starts = _group_starts(values)
    return values[starts].tolist(), np.add.reduceat(w, starts).tolist()
