"""The Tokenizer: rank-based byte-level BPE encoding and decoding, tiktoken-style special tokens.

A tokenizer is three things: a pre-splitting ``pattern``, the ``ranks`` of its mergeable tokens (token bytes ->
id; the id is also the merge priority, lower merges first) and ``special_tokens`` (text -> id, never produced by
merging). A vocabulary made elsewhere may number its tokens in another order than it merges them (a Hugging Face
file can); then ``ids`` (token bytes -> id) is given too, and merging still follows the ranks. Encoding a piece
of text repeatedly joins the adjacent pair whose joined bytes have the lowest rank, exactly like tiktoken; results
are cached per piece, so a corpus costs roughly one regex pass plus dict lookups.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from itertools import chain
from typing import Union

import numpy as np
import regex

from . import formats
from .errors import TokenizerError
from .patterns import GPT4_PATTERN, compile_pattern, fast_equivalent, pattern_from_name
from .trainer import train_bpe

EOT = "<|endoftext|>"

# Pieces longer than this use the linked-list merge with rank buckets (about n log n); shorter ones the simple scan.
LONG_PIECE = 64
# The piece cache is cleared when it grows past this many entries (bounds memory on endless streams).
CACHE_LIMIT = 1 << 20

AllowedSpecial = Union[str, Iterable[str]]


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with :meth:`train`, :meth:`load` or :meth:`from_tiktoken`."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN,
                 special_tokens: dict[str, int] | None = None, ids: dict[bytes, int] | None = None) -> None:
        special_tokens = dict(special_tokens or {})
        if ids is not None and (ids.keys() != ranks.keys()):
            raise TokenizerError("ids must give an id to exactly the tokens that have a rank")
        self._ids = dict(ids) if ids is not None and ids != ranks else None  # None: every id is its rank
        _check_vocab(ranks, special_tokens, self._ids)
        pattern = pattern_from_name(pattern)
        self.pattern = pattern
        self.special_tokens = special_tokens
        self._ranks = dict(ranks)
        # What a rank-based merge returns (ranks) -> what encode returns (ids), only when the two differ.
        self._rank_to_id = {r: self._ids[b] for b, r in self._ranks.items()} if self._ids is not None else None
        self._split = compile_pattern(fast_equivalent(pattern)).findall
        self._decoder: dict[int, bytes] = {i: b for b, i in self.token_ids.items()}
        self._decoder.update((i, s.encode("utf-8")) for s, i in special_tokens.items())
        self._vocab_size = max(self._decoder) + 1
        self._max_token_len = max(len(b) for b in self._ranks)
        self._special_split = (
            regex.compile("|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))
            if special_tokens else None
        )
        self._reset_cache()

    # ---------------------------------------------------------------- construction

    @classmethod
    def train(cls, texts: Union[str, Iterable[str]], vocab_size: int = 4096, pattern: str = GPT4_PATTERN,
              special_tokens: Sequence[str] = (EOT,), min_frequency: int = 1, progress: bool = True,
              num_proc: int | None = None) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of ``vocab_size`` ids (256 bytes + merges + special tokens).

        ``texts`` is one string or an iterable of strings, streamed (never joined). ``pattern`` is a regex or
        "gpt2"/"gpt4"; ``special_tokens`` a list of strings (a single string is one token). See
        :mod:`tokenizer.trainer` for the algorithm and the tie-break rule.
        """
        pattern = pattern_from_name(pattern)
        special_tokens = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(s, str) and s for s in special_tokens):
            raise TokenizerError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise TokenizerError(
                f"vocab_size {vocab_size} is too small: it must be at least 256 (the byte values) + "
                f"{len(special_tokens)} special token(s) = {256 + len(special_tokens)}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise TokenizerError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        vocab = train_bpe(texts, vocab_size - len(special_tokens), pattern, min_frequency=min_frequency,
                          progress=progress, num_proc=num_proc)
        ranks = {b: i for i, b in enumerate(vocab)}
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, pattern, specials)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load our versioned JSON file (see :mod:`tokenizer.formats`)."""
        return formats.load_json(path)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write our versioned JSON file atomically (temp file + rename)."""
        formats.save_json(self, path)

    @classmethod
    def from_tiktoken(cls, path: Union[str, os.PathLike], pattern: str = GPT4_PATTERN,
                      special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """Import a tiktoken rank file (``base64-token rank`` per line), e.g. ``cl100k_base.tiktoken``."""
        return cls(formats.read_tiktoken(path), pattern, special_tokens)

    def save_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Export the mergeable ranks as a tiktoken rank file (special tokens are not part of that format)."""
        formats.write_tiktoken(self, path)

    @classmethod
    def from_huggingface(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Import a Hugging Face byte-level BPE tokenizer (GPT-2's and its family's): a folder, its
        ``tokenizer.json``, or its ``vocab.json`` (with ``merges.txt`` beside it). Gives the ids ``tokenizers``
        gives; see :func:`tokenizer.formats.read_huggingface`."""
        ranks, ids, pattern, special_tokens = formats.read_huggingface(path)
        return cls(ranks, pattern, special_tokens, ids)

    def save_huggingface(self, path: Union[str, os.PathLike]) -> None:
        """Export a Hugging Face ``tokenizer.json`` that gives the same ids as this tokenizer."""
        formats.save_huggingface(self, path)

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids: the largest id + 1 (the size an embedding table needs)."""
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        """The id of ``<|endoftext|>``, or None when this tokenizer has no such special token."""
        return self.special_tokens.get(EOT)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> merge rank for every non-special token (a copy); the rank is also the id unless
        :attr:`ids_differ`."""
        return dict(self._ranks)

    @property
    def token_ids(self) -> dict[bytes, int]:
        """Token bytes -> id for every non-special token (a copy)."""
        return dict(self._ids if self._ids is not None else self._ranks)

    @property
    def ids_differ(self) -> bool:
        """True when token ids are not the merge ranks (a vocabulary imported with its own numbering)."""
        return self._ids is not None

    @cached_property
    def checksum(self) -> str:
        """SHA-256 of the pattern, the ranks and the special tokens: identifies the tokenizer across files."""
        payload = json.dumps(
            {"pattern": self.pattern,
             "ranks": [[b.hex(), i] for b, i in sorted(self._ranks.items(), key=lambda kv: kv[1])],
             "special_tokens": sorted(self.special_tokens.items()),
             # only when present, so that the checksum of every tokenizer whose ids are its ranks is unchanged
             **({"ids": sorted((b.hex(), i) for b, i in self._ids.items())} if self._ids is not None else {})},
            separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to (special tokens: their UTF-8 text)."""
        return self.decode_bytes([token_id])

    def token_byte_lengths(self) -> np.ndarray:
        """int64 array (vocab_size,): bytes each id decodes to; special tokens and unused ids count 0.

        Used for exact bits-per-byte: a special token adds no text bytes.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for b, i in self.token_ids.items():
            lengths[i] = len(b)
        return lengths

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)}, "
                f"checksum={self.checksum[:12]})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.checksum == other.checksum

    __hash__ = None  # type: ignore[assignment]  # mutable cache inside; compare by checksum instead

    # ---------------------------------------------------------------- encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text as ordinary text."""
        if len(self._cache) > CACHE_LIMIT:
            self._reset_cache()
        # One regex pass, then one dict lookup per piece; a miss runs BPE once (_PieceCache.__missing__).
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))
        except UnicodeEncodeError:  # lone surrogates: like tiktoken, join valid pairs and replace the rest by U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Encode text. Special-token text raises TokenizerError unless allowed (tiktoken's semantics).

        ``allowed_special``: "none" (default), "all", or a set of special-token strings to encode as their ids.
        """
        allowed = self._allowed(allowed_special)
        disallowed = self.special_tokens.keys() - allowed
        if disallowed and self._special_split is not None:
            for match in self._special_split.finditer(text):
                if match.group() in disallowed:
                    self._raise_disallowed(match.group())
        if not allowed:
            return self.encode_ordinary(text)
        out: list[int] = []
        start = 0
        for match in self._special_split.finditer(text):
            out += self.encode_ordinary(text[start:match.start()])
            out.append(self.special_tokens[match.group()])
            start = match.end()
        out += self.encode_ordinary(text[start:])
        return out

    def encode_batch(self, texts: Sequence[str], num_proc: int | None = None, *,
                     allowed_special: AllowedSpecial = "none") -> list[list[int]]:
        """Encode many texts; with ``num_proc`` > 1 (default: every CPU for large batches) in several processes."""
        texts = list(texts)
        allowed = sorted(self._allowed(allowed_special))  # validate here, not in a worker; reads an iterable once
        if num_proc is None:
            num_proc = (os.cpu_count() or 1) if sum(map(len, texts)) > (4 << 20) else 1
        num_proc = max(1, min(num_proc, len(texts)))
        if num_proc == 1:
            return [self.encode(t, allowed) for t in texts]
        chunk = max(1, len(texts) // (num_proc * 8))
        state = (self._ranks, self.pattern, self.special_tokens, self._ids)
        with multiprocessing.get_context().Pool(num_proc, _init_worker, (state,)) as pool:
            return pool.starmap(_encode_in_worker, ((t, allowed) for t in texts), chunksize=chunk)

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        if isinstance(allowed_special, str):
            raise TokenizerError(
                f"allowed_special must be 'all', 'none' or a set of special tokens, got {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise TokenizerError(f"allowed_special names unknown special token(s) {sorted(unknown)}; "
                                 f"this tokenizer has {sorted(self.special_tokens)}")
        return allowed

    def _raise_disallowed(self, token: str) -> None:
        raise TokenizerError(
            f"the text contains the special token {token!r}, which encode() does not allow by default; pass "
            f"allowed_special='all' (or a set containing it; CLI: --allowed-special) to encode it as id "
            f"{self.special_tokens[token]}, "
            f"or use encode_ordinary() to encode it as plain text")

    def _reset_cache(self) -> None:
        """Start the piece cache with every token that is valid UTF-8: most pieces are one whole token."""
        self._cache = _PieceCache(self._encode_piece)
        for b, i in self.token_ids.items():
            try:
                self._cache[b.decode("utf-8")] = (i,)
            except UnicodeDecodeError:
                pass

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        """Rank-based BPE on one piece: join the lowest-ranked adjacent pair until no pair is a token."""
        piece = text.encode("utf-8")
        rank = self._ranks.get(piece)
        if rank is not None:  # a whole piece that is a token is that token (as in tiktoken)
            ranks = [rank]
        elif len(piece) > LONG_PIECE:
            ranks = _merge_long(piece, self._ranks, self._max_token_len)
        else:
            ranks = _merge_short(piece, self._ranks)
        return tuple(ranks if self._rank_to_id is None else map(self._rank_to_id.__getitem__, ranks))

    # ---------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids`` (special tokens as their UTF-8 text)."""
        if not isinstance(ids, (list, tuple, np.ndarray)):
            ids = list(ids)
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)) or int(i) not in self._decoder)
            why = (f"id {int(bad)} is not in this vocabulary" if isinstance(bad, (int, np.integer))
                   and 0 <= bad < self.vocab_size else f"valid ids are 0..{self.vocab_size - 1} of this tokenizer")
            raise TokenizerError(
                f"cannot decode id {bad!r}: {why} (was the text encoded with a different tokenizer?)") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; bytes cut in the middle of a UTF-8 character become U+FFFD (``errors="replace"``)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


class _PieceCache(dict):
    """piece text -> ids; a missing piece is encoded once and remembered (dict lookups stay in C)."""

    def __init__(self, encode_piece: Callable[[str], tuple[int, ...]]) -> None:
        super().__init__()
        self._encode_piece = encode_piece

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = self[piece] = self._encode_piece(piece)
        return ids


def _merge_short(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The textbook loop: scan all adjacent pairs, join the lowest-ranked (leftmost on ties), repeat. O(n^2)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    get = ranks.get
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def _merge_long(piece: bytes, ranks: dict[bytes, int], max_len: int) -> list[int]:
    """Same result as :func:`_merge_short`, in about O(n log n), for long pieces.

    Part ``i`` covers ``piece[i:end[i]]`` and the next part starts at ``end[i]`` (a linked list over the bytes).
    ``pending[i]`` is the rank of joining part ``i`` with the next part (None: not a token). Candidate joins wait
    in ``buckets[rank]`` (positions) and ranks in a small heap, so we pop the lowest rank and join its positions
    left to right, exactly the short loop's order. Two facts keep this exact and cheap:

    * a pair only grows, so its rank never returns to an old value: a position whose ``pending`` no longer
      equals the bucket's rank is stale and skipped;
    * a join creates pairs of other ranks only; if one is *lower* than the current rank, it must go first, so the
      rest of the current bucket is put back and the heap decides again.
    """
    n = len(piece)
    end = list(range(1, n + 1))
    prev = list(range(-1, n - 1))
    get = ranks.get
    pending = [get(piece[i:i + 2]) for i in range(n - 1)] + [None]
    buckets: dict[int, list[int]] = {}
    for i, r in enumerate(pending):
        if r is not None:
            buckets.setdefault(r, []).append(i)
    order = list(buckets)
    heapq.heapify(order)

    while order:
        r = heapq.heappop(order)
        positions = sorted(buckets.pop(r))
        for k, i in enumerate(positions):
            if pending[i] != r:
                continue
            mid = end[i]  # join part i with part mid
            stop = end[mid]
            end[i] = stop
            pending[mid] = None
            lowest = r
            right = None
            if stop < n:
                prev[stop] = i
                if end[stop] - i <= max_len:
                    right = get(piece[i:end[stop]])
            pending[i] = right
            if right is not None:  # (written out twice rather than as a helper: this loop is hot)
                bucket = buckets.get(right)
                if bucket is None:
                    buckets[right] = [i]
                    heapq.heappush(order, right)
                else:
                    bucket.append(i)
                lowest = min(lowest, right)
            p = prev[i]
            if p >= 0:
                left = get(piece[p:stop]) if stop - p <= max_len else None
                pending[p] = left
                if left is not None:
                    bucket = buckets.get(left)
                    if bucket is None:
                        buckets[left] = [p]
                        heapq.heappush(order, left)
                    else:
                        bucket.append(p)
                    lowest = min(lowest, left)
            if lowest < r:  # a lower rank appeared: it goes first, the rest of this bucket waits
                if k + 1 < len(positions):
                    buckets[r] = positions[k + 1:]
                    heapq.heappush(order, r)
                break
    out = []
    i = 0
    while i < n:
        out.append(ranks[piece[i:end[i]]])
        i = end[i]
    return out


def _check_vocab(ranks: dict[bytes, int], special_tokens: dict[str, int], ids: dict[bytes, int] | None) -> None:
    """A byte-level vocabulary has every single byte, and no id (or rank) is used twice."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"not a byte-level vocabulary: {len(missing)} single-byte token(s) missing "
                             f"(first: byte {missing[0]}); every byte 0..255 needs an id")
    if not all(isinstance(s, str) and s for s in special_tokens):
        raise TokenizerError(f"special tokens must be non-empty strings, got {sorted(special_tokens)!r}")
    if ids is not None and len(set(ranks.values())) != len(ranks):
        raise TokenizerError("merge ranks must be distinct")
    numbers = list((ids or ranks).values()) + list(special_tokens.values())
    if len(set(numbers)) != len(numbers) or min(numbers) < 0:
        raise TokenizerError("token ids must be distinct non-negative integers (mergeable and special tokens)")


_WORKER: Tokenizer | None = None


def _init_worker(state: tuple) -> None:
    global _WORKER
    _WORKER = Tokenizer(*state)


def _encode_in_worker(text: str, allowed_special: AllowedSpecial) -> list[int]:
    assert _WORKER is not None
    return _WORKER.encode(text, allowed_special)
