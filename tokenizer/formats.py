"""Tokenizer files: our versioned JSON, tiktoken rank files, and Hugging Face files (``tokenizer.json`` in and
out; GPT-2's ``vocab.json`` + ``merges.txt`` in).

Our JSON (``"format": "minigpt-bpe"``, ``"version": 1``)::

    {"format": "minigpt-bpe", "version": 1,
     "pattern": "<pre-splitting regex>",
     "tie_break": "<how training broke ties>",
     "tokens": ["<base64 of the bytes of id 0>", "<... id 1>", ...],   # mergeable tokens; the id is the rank
     "special_tokens": {"<|endoftext|>": 4095},
     "ids": [<id of each token above>],    # only when ids are not the ranks (an imported vocabulary)
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
    if tok.ids_differ:
        ids = tok.token_ids
        doc["ids"] = [ids[b] for b in tokens]
    atomic_write(path, json.dumps(doc, ensure_ascii=False, indent=0) + "\n")


def load_json(path: PathLike, name: str | None = None) -> "Tokenizer":
    """Our JSON file; a Hugging Face ``tokenizer.json`` is read as :func:`load_huggingface` reads it."""
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
    name = name or default_name(path)
    if _is_huggingface(doc):
        return _tokenizer(*_from_tokenizer_json(doc, Path(path)), name)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TokenizerError(f"{path} is not a minigpt tokenizer file (no \"format\": \"{FORMAT}\") nor a Hugging "
                             f"Face tokenizer.json; {hint}")
    return _from_minigpt_json(doc, path, name, hint)


def _from_minigpt_json(doc: dict, path: PathLike, name: str, hint: str) -> "Tokenizer":
    from .tokenizer import Tokenizer

    if doc.get("version") != VERSION:
        raise TokenizerError(f"{path} has tokenizer format version {doc.get('version')!r}; this code reads "
                             f"version {VERSION}; upgrade minigpt or {hint}")
    try:
        ranks = {base64.b64decode(t, validate=True): i for i, t in enumerate(doc["tokens"])}
        ids = dict(zip(ranks, map(int, doc["ids"]))) if "ids" in doc else None
        if ids is not None and len(doc["ids"]) != len(doc["tokens"]):
            raise ValueError("ids and tokens differ in length")
        specials = {str(k): int(v) for k, v in doc["special_tokens"].items()}
        pattern = doc["pattern"]
        checksum = doc["checksum"]
        if not isinstance(pattern, str) or not isinstance(checksum, str):
            raise TypeError("pattern and checksum must be strings")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{path} is a corrupt tokenizer file ({type(e).__name__}: {e}); {hint}") from None
    if len(ranks) != len(doc["tokens"]):
        raise TokenizerError(f"{path} is a corrupt tokenizer file (duplicate tokens); {hint}")
    tok = Tokenizer(ranks, pattern, specials, ids, name=name)
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


def write_tiktoken(tok: "Tokenizer", path: PathLike) -> None:
    if tok.ids_differ:
        raise TokenizerError("this tokenizer numbers its tokens in another order than it merges them, which a "
                             "tiktoken rank file cannot express; save it with save() or save_huggingface()")
    ranks = tok.mergeable_ranks
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
    Special tokens are in the model's vocab too, under their text (as in GPT-2's file): ``tokenizers`` ignores
    an added token's "id" and takes the vocab's, or numbers one missing from the vocab after the vocab's last
    entry, which would move any special token that is not the last id.
    """
    ranks, ids = tok.mergeable_ranks, tok.token_ids
    b2u = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {show(b): i for b, i in sorted(ids.items(), key=lambda kv: kv[1])}
    clash = next((s for s in tok.special_tokens if s in vocab), None)
    if clash is not None:
        raise TokenizerError(f"the special token {clash!r} is written like the ordinary token of id {vocab[clash]} "
                             f"in a tokenizer.json's vocab, so tokenizers would confuse them; rename the special "
                             f"token, or save() the tokenizer as our JSON")
    vocab.update(tok.special_tokens)
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
            "vocab": vocab,
            "merges": [f"{show(a)} {show(b)}" for a, b in derive_merges(ranks)],
        },
    }
    atomic_write(path, json.dumps(doc, ensure_ascii=False))


# ---------------------------------------------------------------- Hugging Face / GPT-2 files in

HF_TOKENIZER_FILE = "tokenizer.json"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"


def default_name(path: PathLike) -> str:
    """The name of a tokenizer read from ``path`` when none is given: a file's stem (``cl100k_base.tiktoken``:
    cl100k_base), but for a ``tokenizer.json`` or ``vocab.json``, whose stems say nothing, its folder's name; a
    folder's name, but for a snapshot in the Hugging Face hub's cache (``models--org--name/snapshots/<commit>``,
    where ``--tokenizer gpt2`` leads), the model's (``org/name``), not the commit's."""
    path = Path(path)
    if path.is_dir() or path.name in (HF_TOKENIZER_FILE, HF_VOCAB_FILE):
        folder = (path if path.is_dir() else path.parent).resolve()  # not the file: the cache links it to a blob
        cache = folder.parent.parent.name
        if folder.parent.name == "snapshots" and cache.startswith("models--"):
            return cache[len("models--"):].replace("--", "/")
        return folder.name or str(folder)
    return path.stem


def load_huggingface(path: PathLike, name: str | None = None) -> "Tokenizer":
    """Read a byte-level BPE tokenizer in Hugging Face form: a folder (its ``tokenizer.json``, else its
    ``vocab.json`` + ``merges.txt``), a ``tokenizer.json`` file, or a ``vocab.json`` with ``merges.txt`` beside it.
    Our own ``tokenizer.json`` (a minigpt checkpoint's) is read too. ``name`` defaults to :func:`default_name`.

    The tokenizer's ranks order the tokens by the merge that makes them (the merge list's order, which is what BPE
    follows); its ids number them as the file does, as ``tokenizers`` does. Tokens are stored there in GPT-2's
    printable stand-in characters (:func:`bytes_to_unicode`), not as bytes.
    """
    path = Path(path)
    name = name or default_name(path)
    if path.is_dir():
        if (path / HF_TOKENIZER_FILE).is_file():
            path = path / HF_TOKENIZER_FILE
        elif (path / HF_VOCAB_FILE).is_file():
            path = path / HF_VOCAB_FILE
        else:
            raise TokenizerError(f"{path} has no {HF_TOKENIZER_FILE} and no {HF_VOCAB_FILE} + {HF_MERGES_FILE}; "
                                 f"give a tokenizer file, or the folder of a minigpt checkpoint or of a Hugging Face "
                                 f"byte-level BPE tokenizer")
    if path.name == HF_VOCAB_FILE:
        return _tokenizer(*_read_vocab_merges(path, path.with_name(HF_MERGES_FILE)), name)
    doc = _read_json_file(path, "tokenizer.json")
    if isinstance(doc, dict) and doc.get("format") == FORMAT:  # ours, e.g. in a minigpt checkpoint folder
        return _from_minigpt_json(doc, path, name, "save it again with Tokenizer.save()")
    return _tokenizer(*_from_tokenizer_json(doc, path), name)


def _tokenizer(ranks: dict[bytes, int], ids: dict[bytes, int], pattern: str, specials: dict[str, int],
               name: str) -> "Tokenizer":
    from .tokenizer import Tokenizer

    return Tokenizer(ranks, pattern, specials, ids, name=name)


def _is_huggingface(doc: object) -> bool:
    return isinstance(doc, dict) and "format" not in doc and isinstance(doc.get("model"), dict)


def _read_json_file(path: Path, what: str) -> object:
    try:
        return json.loads(_read_bytes(path, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); is it a Hugging Face {what} file?") from None


def _from_tokenizer_json(doc: object, path: Path) -> tuple[dict[bytes, int], dict[bytes, int], str, dict[str, int]]:
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path} is not a BPE tokenizer.json (model type "
                             f"{model.get('type') if isinstance(model, dict) else None!r}); only byte-level BPE "
                             f"(GPT-2 family) tokenizers can be read")
    unsupported = [name for name in ("continuing_subword_prefix", "end_of_word_suffix", "dropout")
                   if model.get(name)] + (["byte_fallback"] if model.get("byte_fallback") else [])
    if doc.get("normalizer") is not None:
        unsupported.append("normalizer")
    if unsupported:
        raise TokenizerError(f"{path} uses {', '.join(unsupported)}, which byte-level BPE as GPT-2 does it has "
                             f"not; only GPT-2-style tokenizers can be read")
    pattern = _pattern_of(doc.get("pre_tokenizer"), path)
    vocab = model["vocab"]
    specials = {}
    for added in doc.get("added_tokens") or []:
        try:
            content, declared = str(added["content"]), int(added["id"])
        except (KeyError, TypeError, ValueError):
            raise TokenizerError(f"{path} has a malformed added_tokens entry {added!r}") from None
        # tokenizers ignores the declared id: it takes the vocab's, or numbers a token missing from the vocab
        # after the vocab's entries (what minigpt's exports before the fix did wrong: refuse rather than guess)
        in_vocab = content in vocab
        given = vocab[content] if in_vocab else len(vocab) + sum(1 for s in specials if s not in vocab)
        if given != declared:
            raise TokenizerError(f"{path} declares the added token {content!r} as id {declared}, but tokenizers "
                                 f"gives it id {given} ({'its vocab entry' if in_vocab else 'it is not in the vocab'})"
                                 f"; the file contradicts itself: write it again from the tokenizer it came from")
        specials[content] = declared
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges") or []]
    return _byte_level_vocab(vocab, merges, specials, pattern, path)


def _pattern_of(pre: object, path: Path) -> str:
    """Our split regex for the pre-tokenizers GPT-2-style files use: ByteLevel with its own regex (GPT-2's
    pattern), or a Split regex followed by ByteLevel without one (what :func:`save_huggingface` writes)."""
    from .patterns import GPT2_PATTERN, PATTERNS

    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    steps = steps if isinstance(steps, list) else [steps]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if level is not None and not level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and level.get("use_regex", True):
            return GPT2_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True) and split.get("behavior") == "Isolated"
                and not split.get("invert") and isinstance(split.get("pattern"), dict) and "Regex" in split["pattern"]):
            regex_text = split["pattern"]["Regex"]
            # our own export rewrote a named pattern for Oniguruma: give it back its name's exact text
            return next((p for p in PATTERNS.values() if oniguruma_pattern(p) == regex_text), regex_text)
    raise TokenizerError(f"{path} has a pre-tokenizer this reader does not know ({kinds}); readable are ByteLevel "
                         f"(GPT-2) and Split(regex) + ByteLevel(use_regex=false), without add_prefix_space")


def _read_vocab_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[bytes, int], str,
                                                                     dict[str, int]]:
    from .patterns import GPT2_PATTERN

    vocab = _read_json_file(vocab_path, "vocab.json")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{vocab_path} does not map tokens to ids; is it GPT-2's vocab.json?")
    try:
        text = _read_bytes(merges_path, "merges.txt (beside vocab.json)").decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{merges_path} is not UTF-8 text; is it GPT-2's merges.txt?") from None
    merges = [line.split(" ") for line in text.splitlines() if line and not line.startswith("#version")]
    # These files do not say which entries are special: those that are neither a byte nor made by a merge are
    # (GPT-2's <|endoftext|>), kept as the text they are written as.
    made = {"".join(m) for m in merges if len(m) == 2}
    b2u = set(bytes_to_unicode().values())
    specials = {t: i for t, i in vocab.items() if t not in made and t not in b2u}
    return _byte_level_vocab(vocab, merges, specials, GPT2_PATTERN, merges_path)


def _byte_level_vocab(vocab: dict, merges: list, specials: dict[str, int], pattern: str,
                      path: Path) -> tuple[dict[bytes, int], dict[bytes, int], str, dict[str, int]]:
    """(ranks, ids, pattern, specials) from a stand-in-character vocabulary and its merge list."""
    u2b = {c: b for b, c in bytes_to_unicode().items()}

    def as_bytes(token: str) -> bytes:
        try:
            return bytes(u2b[c] for c in token)
        except (KeyError, TypeError):
            raise TokenizerError(f"{path}: token {token!r} is not written in byte-level form (GPT-2's stand-in "
                                 f"characters); only byte-level BPE tokenizers can be read") from None

    try:
        ids = {as_bytes(t): int(i) for t, i in vocab.items() if t not in specials}
    except (TypeError, ValueError):
        raise TokenizerError(f"{path}: the vocabulary must map tokens to integer ids") from None
    if len(ids) != len([t for t in vocab if t not in specials]):
        raise TokenizerError(f"{path}: two vocabulary entries are the same bytes; the file is corrupt")
    merge_rank: dict[bytes, int] = {}
    for n, merge in enumerate(merges, 1):
        if len(merge) != 2:
            raise TokenizerError(f"{path}: merge {n} is {merge!r}, not two tokens; the file is corrupt")
        a, b = as_bytes(merge[0]), as_bytes(merge[1])
        if a not in ids or b not in ids or a + b not in ids:
            raise TokenizerError(f"{path}: merge {n} ({merge[0]} {merge[1]}) uses or makes a token that is not in "
                                 f"the vocabulary; the file is corrupt")
        merge_rank.setdefault(a + b, n)
    # BPE order: tokens by the merge that makes them, then those no merge makes (they match whole pieces only).
    order = sorted((t for t in ids if len(t) > 1), key=lambda t: (merge_rank.get(t, len(merges) + 1), ids[t]))
    if all(ids[x] < ids[y] for x, y in zip(order, order[1:])):  # the ids follow the merges (GPT-2's files)
        sequence = sorted(ids, key=ids.__getitem__)  # then ranks are the ids, closed up if the specials come first
    else:
        sequence = sorted((t for t in ids if len(t) == 1), key=ids.__getitem__) + order
    return {t: rank for rank, t in enumerate(sequence)}, ids, pattern, specials
