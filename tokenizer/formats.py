"""Tokenizer files: our versioned JSON, tiktoken rank files, and Hugging Face ``tokenizer.json`` export.

Our JSON (``"format": "minigpt-bpe"``, ``"version": 1``)::

    {"format": "minigpt-bpe", "version": 1,
     "pattern": "<pre-splitting regex>",
     "tie_break": "<how training broke ties>",
     "tokens": ["<base64 of the bytes of id 0>", "<... id 1>", ...],   # mergeable tokens; the id is the rank
     "special_tokens": {"<|endoftext|>": 4095},
     "checksum": "<sha256 hex, see Tokenizer.checksum>"}

Every file is written to a temporary file in the same folder and renamed over the target, so a crash or an error
never leaves a partial file behind.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import TokenizerError
from .trainer import TIE_BREAK

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

FORMAT = "minigpt-bpe"
VERSION = 1
PathLike = Union[str, os.PathLike]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")  # the first line of a tiktoken rank file


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


# Read once at import: os.umask is process-wide, so reading it on every write would race with other threads.
_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path} is a directory; give a file path to write to")
    if not path.parent.exists():
        raise TokenizerError(f"folder {path.parent} does not exist; create it first or choose another path")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_bytes(path: PathLike, what: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path} is a directory, not a {what} file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{what} file {path} does not exist; check the path") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {what} file {path}: {e.strerror}") from None


# ---------------------------------------------------------------- our JSON

def save_json(tok: "Tokenizer", path: PathLike) -> None:
    ranks = tok.mergeable_ranks
    tokens = [b for b, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    if [ranks[b] for b in tokens] != list(range(len(tokens))):
        raise TokenizerError("cannot save: mergeable token ids are not contiguous from 0")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "pattern": tok.pattern,
        "tie_break": TIE_BREAK,
        "tokens": [base64.b64encode(b).decode("ascii") for b in tokens],
        "special_tokens": tok.special_tokens,
        "checksum": tok.checksum,
    }
    atomic_write(path, json.dumps(doc, ensure_ascii=False, indent=0) + "\n")


def load_json(path: PathLike) -> "Tokenizer":
    from .tokenizer import Tokenizer

    raw = _read_bytes(path, "tokenizer")
    hint = "re-create it with `python -m tokenizer train` or Tokenizer.save()"
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if _TIKTOKEN_LINE.match(raw):
            raise TokenizerError(f"{path} is a tiktoken rank file, not a minigpt tokenizer JSON; load it with "
                                 f"Tokenizer.from_tiktoken({str(path)!r}, pattern=..., special_tokens=...) and "
                                 f"save() it as JSON") from None
        raise TokenizerError(f"{path} is not a valid tokenizer JSON file ({e}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TokenizerError(f"{path} is not a minigpt tokenizer file (no \"format\": \"{FORMAT}\"); {hint}")
    if doc.get("version") != VERSION:
        raise TokenizerError(f"{path} has tokenizer format version {doc.get('version')!r}; this code reads "
                             f"version {VERSION}; upgrade minigpt or {hint}")
    try:
        ranks = {base64.b64decode(t, validate=True): i for i, t in enumerate(doc["tokens"])}
        specials = {str(k): int(v) for k, v in doc["special_tokens"].items()}
        pattern = doc["pattern"]
        checksum = doc["checksum"]
        if not isinstance(pattern, str) or not isinstance(checksum, str):
            raise TypeError("pattern and checksum must be strings")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{path} is a corrupt tokenizer file ({type(e).__name__}: {e}); {hint}") from None
    if len(ranks) != len(doc["tokens"]):
        raise TokenizerError(f"{path} is a corrupt tokenizer file (duplicate tokens); {hint}")
    tok = Tokenizer(ranks, pattern, specials)
    if tok.checksum != checksum:
        raise TokenizerError(f"{path} is corrupt: its checksum does not match its contents; {hint}")
    return tok


# ---------------------------------------------------------------- tiktoken rank files

def read_tiktoken(path: PathLike) -> dict[bytes, int]:
    """Parse ``<base64 token> <rank>`` lines (tiktoken's format) into token bytes -> rank."""
    raw = _read_bytes(path, "tiktoken rank")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path} line {lineno} is not '<base64 token> <rank>'; "
                                 f"is this a tiktoken rank file?") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no ranks; is this a tiktoken rank file?")
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: PathLike) -> None:
    lines = [f"{base64.b64encode(b).decode('ascii')} {i}\n" for b, i in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write(path, "".join(lines))


# ---------------------------------------------------------------- Hugging Face tokenizer.json

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what Hugging Face's ByteLevel shows in its vocab)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order.

    A token of rank r is the result of rank-based BPE on its own bytes using only ranks below r; the last
    join of that run is its merge. Tokens that this cannot reach (they only arise as whole pieces) get no merge.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) >= 2:
            parts = _merge_below(token, ranks, rank)
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
    return merges


def _merge_below(token: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """Rank-based BPE of ``token`` using only ranks below ``limit``; returns the final parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def oniguruma_pattern(pattern: str) -> str:
    """Rewrite our regex for Hugging Face's engine (Oniguruma, Ruby syntax), which reads ``x{1,3}+`` as
    ``(?:x{1,3})+`` rather than as a possessive ``x{1,3}``. Dropping the ``+`` restores the meaning for our
    patterns, where nothing follows the bounded repeat inside its alternative (so possessive == greedy).
    ``?+``, ``*+`` and ``++`` are possessive in both engines and stay as they are.
    """
    return re.sub(r"(?<!\\)(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def save_huggingface(tok: "Tokenizer", path: PathLike) -> None:
    """Write a ``tokenizer.json`` for Hugging Face ``tokenizers`` that reproduces our ids.

    The pre-tokenizer is a Sequence: our regex as a ``Split`` (behavior "isolated": every match is a piece),
    then ``ByteLevel`` without its own regex, which only maps bytes to GPT-2's printable characters. The BPE
    model has ``ignore_merges`` on: a piece that is a whole token becomes that token, as in our encoder.
    """
    ranks = tok.mergeable_ranks
    b2u = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": oniguruma_pattern(tok.pattern)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {show(b): i for b, i in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [f"{show(a)} {show(b)}" for a, b in derive_merges(ranks)],
        },
    }
    atomic_write(path, json.dumps(doc, ensure_ascii=False))
