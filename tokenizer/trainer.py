"""Byte-level BPE training: count pieces once, then merge with an incremental, positional pair index.

The algorithm, in four steps:

1. **Pre-split** every text with the pattern (GPT-4's by default; ASCII text through an equivalent pattern that
   Python's `re` runs twice as fast, see :func:`~tokenizer.patterns.splitter`) and count each distinct piece, in
   one process per core, each keeping its counts until the end or until they grow past its share of
   :data:`HAND_OVER_PIECES`. A corpus of gigabytes has only a few million distinct pieces, so from here on memory
   and time depend on the number of distinct pieces, not on its size.
2. **Index pairs.** The pieces become one flat table of symbol ids (at first their bytes, ids 0..255) with each
   piece's count (:class:`~tokenizer.piece_table.PieceTable`). We count every adjacent pair, weighted by piece
   counts, into ``pair_counts`` and push ``(-count, pair)`` onto a heap; the table records where each pair occurs.
3. **Merge the best pair.** Pop the heap. An entry may be stale (the pair's count changed after it was
   pushed); stale entries are re-pushed with the current count or dropped ("lazy invalidation"). A fresh entry is
   the most frequent pair. Its merged symbol becomes a new token.
4. **Update only what changed.** The table rewrites the pair's occurrences, all at once with numpy, and reports
   how the counts of the pairs around them changed; pairs that grew are pushed again. The corpus is never
   recounted, and no Python code runs per occurrence.

**Tie-break (deterministic):** among pairs with the same count, the pair ``(left_id, right_id)`` that is smallest
as a tuple of ids wins. Byte symbols have ids equal to their byte value and merged symbols get increasing ids, so
the same counts give the same merges on every run and machine (dict and set iteration order never matters).
Because of this rule the merges depend only on the exact pair counts, not on how they are kept.

If a merged symbol's content already exists in the vocabulary (for example ``"a"+"bc"`` after ``"ab"+"c"``), the
existing id is reused, so every token has distinct bytes (what rank files like tiktoken's require).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Union

import numpy as np
from tqdm.auto import tqdm

from .errors import TokenizerError
from .patterns import PATTERNS, compile_pattern, next_safe_cut, splitter
from .piece_table import PAIR, PieceTable

TIE_BREAK = "highest pair count first; ties: smallest (left_id, right_id) pair"

Symbol = Union[bytes, str]

# Texts are counted in batches of about this many characters (one unit of work for a counting process).
BATCH_CHARS = 1 << 20
# The counting processes together keep at most about this many distinct pieces (some 120 bytes each) before they
# hand them to the main process, each at least MIN_HAND_OVER_PIECES: without a bound each would hold about every
# distinct piece of its share of the corpus, a memory that grows with the corpus and the number of cores. Handing
# over costs the main process about 0.7 s per million pieces (unpickle, add up); on 2 cores a process of the 435 MB
# benchmark holds 0.62 M at its end, so that run hands over once, as before.
HAND_OVER_PIECES = 1 << 21
MIN_HAND_OVER_PIECES = 1 << 18


def learn_merges(
    words: dict[tuple[int, ...], int],
    vocab: list[Symbol],
    vocab_size: int,
    min_frequency: int = 1,
    progress: bool = False,
) -> list[tuple[int, int, int]]:
    """Learn merges on pre-split ``words`` (symbol-id tuple -> count) until ``vocab`` has ``vocab_size`` entries.

    ``vocab`` maps symbol id -> content (bytes for byte-level BPE, or str to run the textbook example with
    characters as symbols); new merged symbols are appended to it. Stops early when no pair occurs at least
    ``min_frequency`` times. Returns the merges in order as ``(left_id, right_id, merged_id)``.
    """
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    symbols = np.fromiter(chain.from_iterable(words), np.int32, int(lengths.sum()))
    counts = np.fromiter(words.values(), np.int64, len(words))
    return merge_table(PieceTable(symbols, lengths, counts), vocab, vocab_size, min_frequency, progress)


def merge_table(
    table: PieceTable, vocab: list[Symbol], vocab_size: int, min_frequency: int = 1, progress: bool = False
) -> list[tuple[int, int, int]]:
    """Steps 2-4 on a piece table: :func:`learn_merges` for pieces already laid out in one.

    A pair ``(left, right)`` is the int ``left * PAIR + right`` (cheaper to hash than a tuple, and it orders
    exactly like the tuple, which is the tie-break).
    """
    pair_counts = table.index_pairs()
    heap = [(-count, key) for key, count in pair_counts.items()]
    heapq.heapify(heap)
    index = {symbol: i for i, symbol in enumerate(vocab)}

    merges: list[tuple[int, int, int]] = []
    bar = tqdm(total=max(vocab_size - len(vocab), 0), desc="merges", unit="tok", disable=not progress, delay=1)
    while len(vocab) < vocab_size and heap:
        neg_count, key = heapq.heappop(heap)
        count = pair_counts.get(key, 0)
        if count != -neg_count:  # stale entry: re-queue with the current count (if the pair still exists)
            if count > 0:
                heapq.heappush(heap, (-count, key))
            continue
        if count < min_frequency:
            break
        left, right = divmod(key, PAIR)
        content = vocab[left] + vocab[right]
        merged = index.get(content)
        if merged is None:
            merged = len(vocab)
            vocab.append(content)
            index[content] = merged
            bar.update(1)
        merges.append((left, right, merged))

        gained, lost = table.merge(left, right, merged)
        for pair, amount in lost:
            pair_counts[pair] -= amount
        for pair, amount in gained:  # only these pairs need a new heap entry; the others are fixed when popped
            pair_counts[pair] = grown = pair_counts.get(pair, 0) + amount
            heapq.heappush(heap, (-grown, pair))
        del pair_counts[key]  # every occurrence of the merged pair is gone
    bar.close()
    return merges


def iter_text_chunks(text: str, max_chars: int = BATCH_CHARS) -> Iterator[str]:
    """Cut a long text into chunks of about ``max_chars`` at newlines between two non-space characters.

    The GPT-2 and GPT-4 patterns split there the same way in the chunk as in the whole (see patterns.py), so
    counting chunk by chunk gives exactly the pieces of the whole text. A custom pattern may split differently
    at the cuts, and a text with no such newline stays one chunk.
    """
    start, n = 0, len(text)
    while n - start > max_chars:
        cut = next_safe_cut(text, start + max_chars)
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _batches(texts: Union[str, Iterable[str]], batch_chars: int) -> Iterator[list[str]]:
    """Group texts (or chunks of one long text) into lists of about ``batch_chars`` characters."""
    if isinstance(texts, str):
        texts = [texts]
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"training texts must be str, got {type(text).__name__}; decode bytes first")
        for chunk in iter_text_chunks(text, batch_chars):
            batch.append(chunk)
            size += len(chunk)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _count_texts(pattern: str, texts: list[str], counter: Counter) -> int:
    """Add the pieces of ``texts`` to ``counter``; return how many characters were counted."""
    split = splitter(pattern)
    check = pattern not in PATTERNS.values()  # the built-in patterns match every character
    for text in texts:
        pieces = split(text)
        if check and sum(map(len, pieces)) != len(text):  # text between matches would be dropped from training
            raise TokenizerError(f"split pattern {pattern!r} does not cover all of the text: some characters are "
                                 f"in no piece; add an alternative such as |\\s|. that matches what is left")
        counter.update(pieces)
    return sum(map(len, texts))


# A counting process keeps its counts across batches and hands them over at the end (or past its limit): sending a
# Counter back for every batch cost the main process more than a second per 100 MB to unpickle and add up.
_worker_counts: Counter = Counter()
_hand_over_barrier = None


def _init_worker(barrier) -> None:
    global _hand_over_barrier
    _hand_over_barrier = barrier


def _count_in_worker(args: tuple[str, list[str], int]) -> tuple[int, Counter | None]:
    """Count a batch into this process's counts: (characters counted, None), or, once the counts hold more than
    ``limit`` distinct pieces, (characters, the counts) and a fresh start, so that memory stays bounded."""
    global _worker_counts
    pattern, texts, limit = args
    size = _count_texts(pattern, texts, _worker_counts)
    if len(_worker_counts) <= limit:
        return size, None
    counts, _worker_counts = _worker_counts, Counter()
    return size, counts


def _hand_over(_: int) -> Counter:
    """Return this process's counts. All processes wait for each other first, so that each takes exactly one of
    the ``num_proc`` hand-over tasks (a process cannot take a second one before every other took its first)."""
    global _worker_counts
    _hand_over_barrier.wait()
    counts, _worker_counts = _worker_counts, Counter()
    return counts


def count_pieces(
    texts: Union[str, Iterable[str]], pattern: str, num_proc: int | None = None, progress: bool = False
) -> Counter:
    """Step 1: count each distinct piece of ``texts``, streamed in batches of about ``BATCH_CHARS`` characters.

    ``num_proc=None`` uses every CPU once there is more than one batch; ``num_proc=1`` stays in this process.
    Memory is bounded by the number of distinct pieces (in this process), :data:`HAND_OVER_PIECES` (in the counting
    processes) and a few batches in flight.
    """
    compile_pattern(pattern)  # fail early, in this process, on a bad regex
    batches = _batches(texts, BATCH_CHARS)
    head = list(islice(batches, 2))
    batches = chain(head, batches)
    procs = num_proc if num_proc is not None else (os.cpu_count() or 1)
    total: Counter = Counter()
    with tqdm(desc="counting", unit="char", unit_scale=True, disable=not progress, delay=1) as bar:
        if len(head) < 2 or procs <= 1:
            for batch in batches:
                bar.update(_count_texts(pattern, batch, total))
            return total
        limit = max(HAND_OVER_PIECES // procs, MIN_HAND_OVER_PIECES)
        work = ((pattern, batch, limit) for batch in batches)
        context = multiprocessing.get_context()
        with context.Pool(procs, initializer=_init_worker, initargs=(context.Barrier(procs),)) as pool:
            for size, counts in _bounded_imap(pool, _count_in_worker, work, window=2 * procs):
                if counts is not None:
                    total.update(counts)
                bar.update(size)
            for counts in pool.imap_unordered(_hand_over, range(procs)):
                total.update(counts)  # the first into an empty Counter is a plain dict update
    return total


def _bounded_imap(pool, fn, items: Iterable, window: int) -> Iterator:
    """Like ``pool.imap`` (results in order) but with at most ``window`` tasks queued: Pool.imap reads its whole
    input ahead, which for a multi-GB corpus would hold all of it in memory."""
    in_flight: deque = deque()
    for item in items:
        in_flight.append(pool.apply_async(fn, (item,)))
        if len(in_flight) >= window:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def train_bpe(
    texts: Union[str, Iterable[str]],
    vocab_size: int,
    pattern: str,
    min_frequency: int = 1,
    progress: bool = False,
    num_proc: int | None = None,
) -> list[bytes]:
    """Train byte-level BPE; return the token bytes by id: the 256 bytes, then one entry per new token."""
    piece_counts = count_pieces(texts, pattern, num_proc=num_proc, progress=progress)
    if not piece_counts:
        raise TokenizerError("the training corpus is empty (no text to learn from); pass a non-empty text or file")
    encoded = [piece.encode("utf-8") for piece in piece_counts]
    counts = np.fromiter(piece_counts.values(), np.int64, len(encoded))
    del piece_counts
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    symbols = np.frombuffer(b"".join(encoded), np.uint8)
    del encoded
    vocab: list[Symbol] = [bytes([b]) for b in range(256)]
    merge_table(PieceTable(symbols, lengths, counts), vocab, vocab_size, min_frequency, progress)
    return vocab  # type: ignore[return-value]
