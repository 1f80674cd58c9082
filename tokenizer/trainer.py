"""Byte-level BPE training: count pieces once, then merge with an incremental pair index.

The algorithm, in four steps:

1. **Pre-split** every text with the pattern (GPT-4's by default) and count each distinct piece. A corpus of
   gigabytes has only a few hundred thousand distinct pieces, so from here on memory and time depend on the
   number of distinct pieces, not on the corpus size.
2. **Index pairs.** Each piece is a list of symbols (at first its bytes, ids 0..255). For every adjacent pair we
   keep ``pair_counts[pair]`` (how often it occurs, weighted by piece counts) and ``where[pair]`` (which pieces
   contain it), and push ``(-count, pair)`` onto a heap.
3. **Merge the best pair.** Pop the heap. An entry may be stale (the pair's count changed after it was
   pushed); stale entries are re-pushed with the current count or dropped ("lazy invalidation"). A fresh entry is
   the most frequent pair. Its merged symbol becomes a new token.
4. **Update only what changed.** Only the pieces in ``where[pair]`` can contain the pair, so we rewrite just those
   pieces and adjust the counts of the pairs around each merge. The corpus is never recounted.

**Tie-break (deterministic):** among pairs with the same count, the pair ``(left_id, right_id)`` that is smallest
as a tuple of ids wins. Byte symbols have ids equal to their byte value and merged symbols get increasing ids, so
the same counts give the same merges on every run and machine (dict and set iteration order never matters).

If a merged symbol's content already exists in the vocabulary (for example ``"a"+"bc"`` after ``"ab"+"c"``), the
existing id is reused, so every token has distinct bytes (what rank files like tiktoken's require).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from itertools import chain, islice
from typing import Union

from tqdm.auto import tqdm

from .errors import TokenizerError
from .patterns import compile_pattern, fast_equivalent, next_safe_cut

TIE_BREAK = "highest pair count first; ties: smallest (left_id, right_id) pair"

Symbol = Union[bytes, str]

# A pair (left, right) of symbol ids is the int left * PAIR + right (ids stay below 2**32).
PAIR = 1 << 32

# Texts are counted in batches of about this many characters (one unit of work for a counting process).
BATCH_CHARS = 1 << 20


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

    A pair ``(left, right)`` is stored as the int ``left * PAIR + right`` (cheaper to hash than a tuple, and
    it orders exactly like the tuple, which is the tie-break).
    """
    pieces = [list(w) for w in words]
    counts = list(words.values())
    pair_counts, where = index_pairs(pieces, counts)
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

        # Rewrite only the pieces that contain the pair. Around each join "x left right y" -> "x merged y",
        # the pairs (x, left) and (right, y) lose the piece's count and (x, merged), (merged, y) gain it.
        grown: set[int] = set()
        for i in where.pop(key):
            symbols, count_i = pieces[i], counts[i]
            # One pass that copies the piece into `rewritten` (slices between the joins), so a piece of n symbols
            # costs O(n) per merge however many joins it has; deleting in place would cost O(n) per join.
            todo = symbols.count(left)  # candidate positions (a stale `where` entry has no matching pair)
            rewritten: list[int] = []
            done = k = 0  # symbols[:done] are in `rewritten`; look for `left` from k on
            while todo:
                k = symbols.index(left, k)
                todo -= 1
                if k + 1 == len(symbols) or symbols[k + 1] != right:
                    k += 1
                    continue
                rewritten += symbols[done:k]
                if rewritten:
                    x = rewritten[-1]
                    pair_counts[x * PAIR + left] -= count_i
                    new = x * PAIR + merged
                    pair_counts[new] += count_i
                    where[new].add(i)
                    grown.add(new)
                if k + 2 < len(symbols):
                    y = symbols[k + 2]
                    pair_counts[right * PAIR + y] -= count_i
                    new = merged * PAIR + y
                    pair_counts[new] += count_i
                    where[new].add(i)
                    grown.add(new)
                rewritten.append(merged)
                done = k = k + 2  # past the right symbol, which cannot start another join
                if right == left:
                    todo -= 1  # the right symbol was one of the candidates
            if done:
                rewritten += symbols[done:]
                pieces[i] = rewritten
        del pair_counts[key]
        # Only pairs that contain the new symbol grew; the others only shrank (fixed lazily when popped).
        for new in grown:
            heapq.heappush(heap, (-pair_counts[new], new))
    bar.close()
    return merges


def index_pairs(pieces: list[list[int]], counts: list[int]) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Step 2: count every adjacent pair (weighted by piece count) and record which pieces contain it.

    Keys are ``left * PAIR + right``; both dicts are defaultdicts so the merge loop can update them freely.
    """
    pair_counts: dict[int, int] = defaultdict(int)
    where: dict[int, set[int]] = defaultdict(set)
    for i, (symbols, count) in enumerate(zip(pieces, counts)):
        for left, right in zip(symbols, symbols[1:]):
            key = left * PAIR + right
            pair_counts[key] += count
            where[key].add(i)
    return pair_counts, where


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


def _count_batch(args: tuple[str, list[str]]) -> tuple[Counter, int]:
    pattern, batch = args
    findall = compile_pattern(fast_equivalent(pattern)).findall
    counter: Counter = Counter()
    for text in batch:
        pieces = findall(text)
        if sum(map(len, pieces)) != len(text):  # text between matches would silently be dropped from training
            raise TokenizerError(f"split pattern {pattern!r} does not cover all of the text: some characters are "
                                 f"in no piece; add an alternative such as |\\s|. that matches what is left")
        counter.update(pieces)
    return counter, sum(len(t) for t in batch)


def count_pieces(
    texts: Union[str, Iterable[str]], pattern: str, num_proc: int | None = None, progress: bool = False
) -> Counter:
    """Step 1: count each distinct piece of ``texts``, streamed in batches of about ``BATCH_CHARS`` characters.

    ``num_proc=None`` uses every CPU once there is more than one batch; ``num_proc=1`` stays in this process.
    Memory is bounded by the number of distinct pieces plus a few batches in flight.
    """
    compile_pattern(pattern)  # fail early, in this process, on a bad regex
    batches = _batches(texts, BATCH_CHARS)
    head = list(islice(batches, 2))
    work = ((pattern, batch) for batch in chain(head, batches))
    procs = num_proc if num_proc is not None else (os.cpu_count() or 1)
    total: Counter = Counter()
    with tqdm(desc="counting", unit="char", unit_scale=True, disable=not progress, delay=1) as bar, \
            ExitStack() as stack:
        if len(head) < 2 or procs <= 1:
            results: Iterator[tuple[Counter, int]] = map(_count_batch, work)
        else:
            pool = stack.enter_context(multiprocessing.get_context().Pool(procs))
            results = _bounded_imap(pool, _count_batch, work, window=2 * procs)
        for counter, size in results:
            total.update(counter)
            bar.update(size)
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
    words = {tuple(piece.encode("utf-8")): count for piece, count in piece_counts.items()}
    del piece_counts
    vocab: list[Symbol] = [bytes([b]) for b in range(256)]
    learn_merges(words, vocab, vocab_size, min_frequency=min_frequency, progress=progress)
    return vocab  # type: ignore[return-value]
