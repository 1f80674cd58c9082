"""The Tokenizer: rank-based byte-level BPE encoding and decoding, tiktoken-style special tokens.

A tokenizer is three things: a pre-splitting ``pattern``, the ``ranks`` of its mergeable tokens (token bytes ->
id; the id is also the merge priority, lower merges first) and ``special_tokens`` (text -> id, never produced by
merging). A vocabulary made elsewhere may number its tokens in another order than it merges them (a Hugging Face
file can); then ``ids`` (token bytes -> id) is given too, and merging still follows the ranks. Encoding a piece
of text repeatedly joins the adjacent pair whose joined bytes have the lowest rank, exactly like tiktoken; results
are cached per piece, so a corpus costs roughly one regex pass plus dict lookups.

A Tokenizer also offers ``tiktoken.Encoding``'s public surface with tiktoken's semantics (``encode`` with
``allowed_special``/``disallowed_special``, the batch methods, ``encode_single_token``, ``decode_with_offsets``,
``n_vocab``, ``eot_token``, ...), so code written for tiktoken (nanoGPT's data preparation, nanochat's tokenizer
wrapper) takes it unchanged; it pickles, so it can be handed to worker processes.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, lru_cache
from itertools import chain
from pathlib import Path
from typing import Union

import numpy as np
import regex

from . import formats
from .errors import NotATokenIdError, TokenizerError, UnknownTokenError
from .patterns import GPT4_PATTERN, pattern_from_name, splitter
from .trainer import train_bpe

EOT = "<|endoftext|>"

# Pieces longer than this use the linked-list merge with rank buckets (about n log n); shorter ones the simple scan.
LONG_PIECE = 64
# The piece cache is cleared when it grows past this many entries (bounds memory on endless streams).
CACHE_LIMIT = 1 << 20
# A batch with fewer characters than this is encoded in this process unless num_proc asks for workers: starting
# processes costs more than they save on it.
BATCH_IN_PROCESSES = 4 << 20
# What encode_bytes counts as whitespace when it widens the unstable end of valid text (as tiktoken does).
_SPACE_BYTES = frozenset(b" \n\t")

# allowed_special and disallowed_special: "all", "none" (ours; tiktoken writes set() or ()), or a collection of
# special-token strings (disallowed_special: of any strings, as in tiktoken).
SpecialSet = Union[str, Iterable[str]]


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with :meth:`train`, :meth:`load` or :meth:`from_tiktoken`."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN,
                 special_tokens: dict[str, int] | None = None, ids: dict[bytes, int] | None = None, *,
                 name: str | None = None) -> None:
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
        self._token_ids = self._ids if self._ids is not None else self._ranks  # token bytes -> id (not a copy)
        self._split = splitter(pattern)  # the pattern's findall, with a faster path for ASCII text
        self._decoder: dict[int, bytes] = {i: b for b, i in self._token_ids.items()}
        self._decoder.update((i, s.encode("utf-8")) for s, i in special_tokens.items())
        self._vocab_size = max(self._decoder) + 1
        self._max_token_len = max(len(b) for b in self._ranks)
        self._special_set = frozenset(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        self.name = name  # tiktoken's Encoding.name: given, the file's stem, or (None) one made from the checksum
        self._reset_cache()

    # ---------------------------------------------------------------- construction

    @classmethod
    def train(cls, texts: Union[str, Iterable[str]], vocab_size: int = 4096, pattern: str = GPT4_PATTERN,
              special_tokens: Sequence[str] = (EOT,), min_frequency: int = 1, progress: bool = True,
              num_proc: int | None = None, *, name: str | None = None) -> "Tokenizer":
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
        if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
            raise TokenizerError(f"num_proc must be a positive integer (or None for every CPU), got {num_proc!r}")
        vocab = train_bpe(texts, vocab_size - len(special_tokens), pattern, min_frequency=min_frequency,
                          progress=progress, num_proc=num_proc)
        ranks = {b: i for i, b in enumerate(vocab)}
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, pattern, specials, name=name)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, name: str | None = None) -> "Tokenizer":
        """Load a tokenizer file or folder, whatever its kind: the one loader that every command uses.

        A folder (a minigpt checkpoint, a Hugging Face model) or a ``vocab.json`` is read by
        :meth:`from_huggingface`; any other file is our versioned JSON (see :mod:`tokenizer.formats`) or a Hugging
        Face ``tokenizer.json``, and a tiktoken rank file is explained. ``name`` defaults to one made from the path
        (:func:`tokenizer.formats.default_name`)."""
        path = Path(path)
        if path.is_dir() or path.name == formats.HF_VOCAB_FILE:
            return formats.load_huggingface(path, name)
        return formats.load_json(path, name)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write our versioned JSON file atomically (temp file + rename)."""
        formats.save_json(self, path)

    @classmethod
    def from_tiktoken(cls, path: Union[str, os.PathLike], pattern: str = GPT4_PATTERN,
                      special_tokens: dict[str, int] | None = None, *, name: str | None = None) -> "Tokenizer":
        """Import a tiktoken rank file (``base64-token rank`` per line), e.g. ``cl100k_base.tiktoken``.
        ``name`` defaults to the file's stem."""
        return cls(formats.read_tiktoken(path), pattern, special_tokens, name=name or formats.default_name(path))

    def save_tiktoken(self, path: Union[str, os.PathLike]) -> None:
        """Export the mergeable ranks as a tiktoken rank file (special tokens are not part of that format)."""
        formats.write_tiktoken(self, path)

    @classmethod
    def from_huggingface(cls, path: Union[str, os.PathLike], *, name: str | None = None) -> "Tokenizer":
        """Import a Hugging Face byte-level BPE tokenizer (GPT-2's and its family's): a folder, its
        ``tokenizer.json``, or its ``vocab.json`` (with ``merges.txt`` beside it). Gives the ids ``tokenizers``
        gives; see :func:`tokenizer.formats.load_huggingface`. A minigpt checkpoint folder or our own
        ``tokenizer.json`` is read too. ``name`` defaults to the model's name
        (:func:`tokenizer.formats.default_name`)."""
        return formats.load_huggingface(path, name)

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
        return dict(self._token_ids)

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

    def token_byte_lengths(self) -> np.ndarray:
        """int64 array (vocab_size,): bytes each id decodes to; special tokens and unused ids count 0.

        Used for exact bits-per-byte: a special token adds no text bytes.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for b, i in self._token_ids.items():
            lengths[i] = len(b)
        return lengths

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={len(self.special_tokens)}, checksum={self.checksum[:12]})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.checksum == other.checksum

    def __hash__(self) -> int:
        """By checksum, like equality (the piece cache inside changes neither): a tiktoken.Encoding is hashable, and
        code written for it keys dicts or ``lru_cache`` by the encoding."""
        return hash(self.checksum)

    def __getstate__(self) -> dict:
        """Pickle the definition only (multiprocessing with spawn, datasets' map): the cache is rebuilt."""
        return {"ranks": self._ranks, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "ids": self._ids, "name": self._name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # ---------------------------------------------------------------- tiktoken.Encoding's names

    @property
    def name(self) -> str:
        """tiktoken's encoding name: given at construction or load, by default made from the path it was loaded from
        (:func:`tokenizer.formats.default_name`); a tokenizer made in memory is called ``minigpt-`` + the start of
        its checksum. Not stored in our file."""
        return self._name if self._name is not None else f"minigpt-{self.checksum[:12]}"

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value

    @property
    def n_vocab(self) -> int:
        """tiktoken's name for :attr:`vocab_size` (the largest id + 1)."""
        return self._vocab_size

    @property
    def max_token_value(self) -> int:
        """The largest id, special tokens included."""
        return self._vocab_size - 1

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>``; a KeyError (:class:`UnknownTokenError`) when there is none, as in tiktoken
        (:attr:`eot_id` gives None instead)."""
        if EOT not in self.special_tokens:
            raise UnknownTokenError(f"this tokenizer has no {EOT} special token, so no eot_token (its special "
                                    f"tokens: {sorted(self.special_tokens) or 'none'})")
        return self.special_tokens[EOT]

    @property
    def special_tokens_set(self) -> set[str]:
        """The special tokens' strings (a new set each time)."""
        return set(self.special_tokens)

    def is_special_token(self, token: int) -> bool:
        """Whether an id is a special token's."""
        return token in self._special_ids

    @property
    def _pat_str(self) -> str:
        """tiktoken's name for :attr:`pattern` (read-only; tiktoken's README builds new encodings from it)."""
        return self.pattern

    @property
    def _mergeable_ranks(self) -> dict[bytes, int]:
        """tiktoken's mergeable ranks: token bytes -> rank, which tiktoken also uses as the id (a copy)."""
        if self._ids is not None:
            raise TokenizerError("this tokenizer numbers its tokens in another order than it merges them, which "
                                 "tiktoken's mergeable_ranks cannot express; use mergeable_ranks and token_ids")
        return dict(self._ranks)

    @property
    def _special_tokens(self) -> dict[str, int]:
        """tiktoken's name for :attr:`special_tokens` (a copy)."""
        return dict(self.special_tokens)

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
        except (AttributeError, TypeError):
            if isinstance(text, str):
                raise
            hint = "; encode_bytes() takes bytes" if isinstance(text, (bytes, bytearray, memoryview)) else ""
            raise TypeError(f"text to encode must be str, not {type(text).__name__}{hint}") from None

    def encode(self, text: str, allowed_special: SpecialSet = frozenset(), *,
               disallowed_special: SpecialSet = "all") -> list[int]:
        """Encode text; special-token text is refused unless allowed, with tiktoken's rules.

        ``allowed_special``: special tokens encoded as their ids: a set of them, "all", or "none" / an empty set
        (the default). ``disallowed_special``: strings whose presence in the text raises TokenizerError (a
        ValueError, as tiktoken's): "all" (the default) means every special token not allowed; ``()`` or "none"
        encodes the special tokens that are not allowed as ordinary text. A token in both sets raises when found.
        """
        allowed = self._allowed(allowed_special)
        disallowed = self._disallowed(disallowed_special, allowed)
        if disallowed:
            match = _special_regex(disallowed).search(text)
            if match:
                self._raise_disallowed(match.group())
        if not allowed:
            return self.encode_ordinary(text)
        out: list[int] = []
        start = 0
        for match in _special_regex(allowed).finditer(text):
            out += self.encode_ordinary(text[start:match.start()])
            out.append(self.special_tokens[match.group()])
            start = match.end()
        out += self.encode_ordinary(text[start:])
        return out

    def encode_to_numpy(self, text: str, allowed_special: SpecialSet = frozenset(), *,
                        disallowed_special: SpecialSet = "all") -> np.ndarray:
        """:meth:`encode` as a uint32 array (tiktoken's ``encode_to_numpy``)."""
        return np.array(self.encode(text, allowed_special, disallowed_special=disallowed_special), dtype=np.uint32)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode arbitrary bytes, invalid UTF-8 included, exactly as tiktoken's ``_encode_bytes``.

        Valid UTF-8 is ordinary text. Otherwise the valid prefix is encoded as text, and the bytes from the start of
        its last piece (widened back over whitespace-only tokens, whose pieces can merge differently) to the end
        are joined by BPE as one piece: a regex cannot split bytes that are not text.
        """
        data = _as_bytes(data, "encode_bytes() takes bytes")
        try:
            return self.encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            valid = e.start
        pieces = self._split(data[:valid].decode("utf-8"))
        tokens = list(chain.from_iterable(map(self._cache.__getitem__, pieces)))
        unstable = len(self._cache[pieces[-1]]) if pieces else 0
        if unstable and self._is_space(tokens[-unstable]):
            while unstable < len(tokens) and self._is_space(tokens[-unstable - 1]):
                unstable += 1
        tail = data[valid:]
        if unstable:
            tail = self.decode_bytes(tokens[-unstable:]) + tail
            del tokens[-unstable:]
        return tokens + list(self._bpe(tail))

    _encode_bytes = encode_bytes  # tiktoken's (private) name for it

    def _is_space(self, token: int) -> bool:
        return all(b in _SPACE_BYTES for b in self._decoder[token])

    def encode_single_token(self, text_or_bytes: Union[str, bytes]) -> int:
        """The id of text (or bytes) that is exactly one token, special tokens included; a KeyError
        (:class:`UnknownTokenError`) otherwise."""
        piece = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else \
            _as_bytes(text_or_bytes, "encode_single_token() takes str or bytes")
        token = self._token_ids.get(piece)
        if token is None:
            try:
                token = self.special_tokens.get(piece.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        if token is None:
            raise UnknownTokenError(f"{text_or_bytes!r} is not one token of this vocabulary (encode() splits text "
                                    f"into tokens)")
        return token

    def encode_batch(self, text: Sequence[str], num_proc: int | None = None, *, num_threads: int | None = None,
                     allowed_special: SpecialSet = frozenset(),
                     disallowed_special: SpecialSet = "all") -> list[list[int]]:
        """:meth:`encode` each text, in worker processes for large batches (see :meth:`_worker_count`)."""
        allowed = self._allowed(allowed_special)  # checked here, not in a worker; an iterable is read once
        return self._encode_many(list(text), (allowed, self._disallowed(disallowed_special, allowed)),
                                 num_proc, num_threads)

    def encode_ordinary_batch(self, text: Sequence[str], num_proc: int | None = None, *,
                              num_threads: int | None = None) -> list[list[int]]:
        """:meth:`encode_ordinary` each text, in worker processes for large batches (see :meth:`_worker_count`)."""
        return self._encode_many(list(text), None, num_proc, num_threads)

    def _encode_many(self, texts: list[str], specials: tuple[frozenset, frozenset] | None, num_proc: int | None,
                     num_threads: int | None) -> list[list[int]]:
        workers = self._worker_count(texts, num_proc, num_threads)
        if workers == 1:
            return [_encode_with(self, t, specials) for t in texts]
        chunk = max(1, len(texts) // (workers * 8))
        with multiprocessing.get_context().Pool(workers, _init_worker, (self,)) as pool:
            return pool.starmap(_encode_in_worker, ((t, specials) for t in texts), chunksize=chunk)

    @staticmethod
    def _worker_count(texts: list[str], num_proc: int | None, num_threads: int | None) -> int:
        """How many processes encode a batch. ``num_proc`` asks for exactly that many; ``num_threads`` (tiktoken's
        name) for at most that many, and neither for one per CPU. Our encoder is Python, so the workers are
        processes, not threads; they cost a start-up, so without ``num_proc`` a batch under
        :data:`BATCH_IN_PROCESSES` characters is encoded in this process."""
        if num_proc is not None and num_threads is not None:
            raise TokenizerError("give num_proc or num_threads, not both: each sets the number of worker processes")
        for flag, value in (("num_proc", num_proc), ("num_threads", num_threads)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TokenizerError(f"{flag} must be a positive integer, got {value!r}")
        cpus = os.cpu_count() or 1
        if num_proc is None:
            num_proc = min(num_threads or cpus, cpus) if sum(map(len, texts)) > BATCH_IN_PROCESSES else 1
        return max(1, min(num_proc, len(texts)))

    def _allowed(self, allowed_special: SpecialSet) -> frozenset[str]:
        """The special tokens to encode as ids. Names that are not special tokens are ignored, as in tiktoken (a
        real one in the text is still refused unless allowed)."""
        if allowed_special == "all":
            return self._special_set
        if allowed_special == "none":
            return frozenset()
        if isinstance(allowed_special, str):
            raise TokenizerError(
                f"allowed_special must be 'all', 'none' or a set of special tokens, got {allowed_special!r}")
        return self._special_set.intersection(allowed_special)

    def _disallowed(self, disallowed_special: SpecialSet, allowed: frozenset[str]) -> frozenset[str]:
        """The strings whose presence raises: "all" is every special token not allowed (tiktoken's rule)."""
        if disallowed_special == "all":
            return self._special_set - allowed if allowed else self._special_set  # the latter's hash is cached
        if disallowed_special == "none":
            return frozenset()
        if isinstance(disallowed_special, str):
            raise TokenizerError(f"disallowed_special must be 'all', 'none', () or a set of special tokens, got "
                                 f"{disallowed_special!r}")
        return frozenset(disallowed_special)

    def _raise_disallowed(self, token: str) -> None:
        to_id = f" as id {self.special_tokens[token]}" if token in self.special_tokens else ""
        raise TokenizerError(
            f"the text contains the special token {token!r}, which encode() does not allow by default; pass "
            f"allowed_special='all' (or a set containing it; CLI: --allowed-special) to encode it{to_id}, "
            f"or use encode_ordinary() (or disallowed_special=()) to encode it as plain text")

    def _reset_cache(self) -> None:
        """Start the piece cache with every token that is valid UTF-8: most pieces are one whole token."""
        self._cache = _PieceCache(self._encode_piece)
        for b, i in self._token_ids.items():
            try:
                self._cache[b.decode("utf-8")] = (i,)
            except UnicodeDecodeError:
                pass

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        return self._bpe(text.encode("utf-8"))

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        """Rank-based BPE on one piece: join the lowest-ranked adjacent pair until no pair is a token."""
        if not piece:
            return ()
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
        """The exact bytes of ``ids`` (special tokens as their UTF-8 text). An id that is not an integer is a
        TypeError (:class:`NotATokenIdError`), as in tiktoken, and so is an array of floats; but a float in a list
        that equals an id (``2.0``) is read as that id: checking each element's type would slow decoding by a
        third. An id this vocabulary lacks is a KeyError (:class:`UnknownTokenError`)."""
        if not isinstance(ids, (list, tuple, np.ndarray)):
            ids = list(ids)
        elif isinstance(ids, np.ndarray) and ids.dtype.kind not in "iu":
            raise NotATokenIdError(f"cannot decode an array of {ids.dtype}: token ids must be integers")
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)) or int(i) not in self._decoder)
            raise self._unknown(bad) from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; bytes cut in the middle of a UTF-8 character become U+FFFD (``errors="replace"``)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one id, special tokens included; a KeyError (:class:`UnknownTokenError`) for an unknown id."""
        if not isinstance(token, (int, np.integer)):
            raise self._unknown(token)
        try:
            return self._decoder[token]
        except KeyError:
            raise self._unknown(token) from None

    token_bytes = decode_single_token_bytes  # our shorter name for it

    def decode_tokens_bytes(self, tokens: Iterable[int]) -> list[bytes]:
        """The bytes of each id (to show how a text was split)."""
        return [self.decode_single_token_bytes(t) for t in tokens]

    def decode_with_offsets(self, tokens: Sequence[int]) -> tuple[str, list[int]]:
        """The text and the character offset where each token starts, as tiktoken defines it: a token that begins
        inside a character (its first byte a UTF-8 continuation byte) starts at that character. Bytes that are not
        valid UTF-8 raise UnicodeDecodeError, as in tiktoken."""
        token_bytes = self.decode_tokens_bytes(tokens)
        text_len = 0
        offsets = []
        for token in token_bytes:
            offsets.append(max(0, text_len - (0x80 <= token[0] < 0xC0)))
            text_len += sum(1 for c in token if not 0x80 <= c < 0xC0)  # characters start at non-continuation bytes
        return b"".join(token_bytes).decode("utf-8", errors="strict"), offsets

    def decode_batch(self, batch: Iterable[Sequence[int]], *, errors: str = "replace",
                     num_threads: int | None = None) -> list[str]:
        """:meth:`decode` each id list. ``num_threads`` is taken for tiktoken's signature only: decoding is a join
        of bytes, faster here than handed to workers."""
        return [self.decode(ids, errors) for ids in batch]

    def decode_bytes_batch(self, batch: Iterable[Sequence[int]], *, num_threads: int | None = None) -> list[bytes]:
        """:meth:`decode_bytes` each id list (``num_threads`` as in :meth:`decode_batch`)."""
        return [self.decode_bytes(ids) for ids in batch]

    def token_byte_values(self) -> list[bytes]:
        """The bytes of every mergeable (non-special) token, sorted, as tiktoken lists them."""
        return sorted(self._token_ids)

    def _unknown(self, bad: object) -> TokenizerError:
        if not isinstance(bad, (int, np.integer)):
            return NotATokenIdError(f"cannot decode id {bad!r}: token ids must be integers, not {type(bad).__name__}")
        inside = isinstance(bad, (int, np.integer)) and 0 <= bad < self.vocab_size
        why = f"id {int(bad)} is not in this vocabulary" if inside else \
            f"valid ids are 0..{self.vocab_size - 1} of this tokenizer"
        return UnknownTokenError(f"cannot decode id {bad!r}: {why} (was the text encoded with a different tokenizer?)")


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


def _as_bytes(data: object, takes: str) -> bytes:
    """``data`` as bytes if it is bytes-like (tiktoken takes bytes only; bytearray and memoryview are read too), else
    a TypeError: ``bytes(3)`` would be three zero bytes."""
    if isinstance(data, bytes):
        return data
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise TypeError(f"{takes}, not {type(data).__name__}") from None


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


@lru_cache(maxsize=128)
def _special_regex(tokens: frozenset[str]) -> regex.Pattern:
    """A regex that finds any of ``tokens`` (the longest first where one starts another)."""
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _encode_with(tok: Tokenizer, text: str, specials: tuple[frozenset, frozenset] | None) -> list[int]:
    """encode_ordinary (``specials`` None) or encode with (allowed, disallowed) special tokens."""
    if specials is None:
        return tok.encode_ordinary(text)
    return tok.encode(text, specials[0], disallowed_special=specials[1])


_WORKER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER
    _WORKER = tok


def _encode_in_worker(text: str, specials: tuple[frozenset, frozenset] | None) -> list[int]:
    assert _WORKER is not None
    return _encode_with(_WORKER, text, specials)
