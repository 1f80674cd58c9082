"""From a corpus to token files: train (or load) the tokenizer, split train/val, encode in parallel, store.

A prepared-data folder, `<cache_dir>/<source name>-<fingerprint>/`, holds

- `train.bin`, `val.bin`: the token ids, raw little-endian uint16 when the vocabulary has at most 65536 ids,
  else uint32, read back as numpy memmaps (no copy in RAM, shared by every process of a run);
- `tokenizer.json`: the tokenizer that made them;
- `meta.json`: the header (`format` "minigpt-tokens", `version`, `vocab_size`, `dtype`, `eot_id`, `tokens`,
  `bytes` and `documents` (a document cut in two counts in both) per split, `split_rule`, `tokenizer_checksum`,
  `source`, `fingerprint`, and the settings).

The split holds out about val_fraction of the text, spread through the corpus, the same way on every run: the
documents are taken in corpus order in stretches of whole documents of at least SPLIT_STRETCH_CHARS characters
(the last stretch: what is left), and the last val_fraction of the characters of each stretch (at least one, so
that every corpus of two characters or more has some) is held out for validation. The cut is placed at the best
place within a quarter of the held-out share of the exact point: a document boundary, else (inside a document, which
is then cut in two, its head to train and its tail to validate) after a line end, else before whitespace, else at
the exact point. So the held-out share of tokens is close to val_fraction for a corpus of a few files or one long
line as for thousands of documents, and the preparation says what share it achieved.

Each document (and each piece of a cut one) is preceded by the end-of-text token (when the tokenizer has one), so
a split reads EOT d0 EOT d1 ...: its documents joined with EOT, and every document, the first too, follows an EOT,
which is the prompt for unconditional sampling. A literal "<|endoftext|>" inside a document is encoded as ordinary text.

Memory stays bounded on corpora larger than RAM: documents stream from the source, are encoded in chunks of about
1 MiB by a pool of processes (one per core, fed by the main process, which reads, splits and writes) with at most
2 chunks per process in flight, and are appended to the files as they come back; each encoder's piece cache is
capped (tokenizer.CACHE_LIMIT). The end says the throughput, in MB/s and tokens/s. The folder is built under a
temporary name and renamed into place only when complete, so an interrupted preparation never leaves a folder
that looks valid (and the next preparation of the same folder on the same machine deletes the temporary folder of
one that was killed).

The folder's name holds a fingerprint of everything that decides its content: the corpus (the source's identity:
file paths, sizes and modification times, or the dataset's name, config, split and field; max_bytes,
val_fraction, the errors mode, the split rule), then the tokenizer (the checksum of a given one, or the settings to train one).
The same call again reuses the folder without reading the corpus; a changed input makes a new one. A given
tokenizer also reuses a folder of the same corpus whose trained tokenizer has its checksum. Processes that ask for
the same folder at once (the ranks of a torchrun job) take turns through a file lock: the first builds it, the
others wait for it, however long it takes, and reuse it.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.errors import DataError
from data.lock import file_lock
from data.sources import Source, open_source
from tokenizer import Tokenizer, pattern_from_name

FORMAT = "minigpt-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"
# The tokenizer is trained on at most this many bytes of training text (the first documents of the train split):
# the default corpus fits whole (about 6 s), and a corpus of many GB still gets its merges in seconds, close to
# those that all of it would give.
DEFAULT_TOKENIZER_MAX_BYTES = 16_000_000
# The split holds out the last val_fraction of every stretch of documents of about this many characters.
SPLIT_STRETCH_CHARS = 1 << 20
SPLIT_RULE = 2  # in the fingerprint, so that a folder split by an earlier rule is never reused
_CUT_PLACES = (re.compile(r"(?<=\n)"), re.compile(r"(?=\s)"))  # after a line end; before whitespace
ENCODE_CHUNK_BYTES = 1 << 20  # documents are sent to the encoding processes in chunks of about this much text


@dataclass
class PreparedData:
    """A prepared-data folder, opened: the tokenizer and the token memmaps of both splits."""

    dir: Path
    tokenizer: Tokenizer
    tokenizer_path: Path
    meta: dict
    train_tokens: np.memmap
    val_tokens: np.memmap


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_data(
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "out/data",
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_field: str = "text",
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    vocab_size: int = 4096,
    pattern: str = "gpt4",
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    verbose: bool = True,
    split: str = "train",
    errors: str = "strict",
    tokenizer_max_bytes: int | None = DEFAULT_TOKENIZER_MAX_BYTES,
) -> PreparedData:
    """Prepare `source` (default: the offline corpus) under `cache_dir`, or reuse an earlier preparation.

    tokenizer: a tokenizer JSON path (or Tokenizer) to encode with; None trains one on the training split with
        `vocab_size` and `pattern` ("gpt2", "gpt4" or a regex) on at most `tokenizer_max_bytes` of text (None: all).
    max_bytes: use only the first max_bytes of UTF-8 text of the corpus (the last document cut at a line end).
    errors: "strict" stops at the first byte that is not UTF-8; "replace" reads it as U+FFFD.
    num_proc: encoding processes (None: one per CPU core; small corpora use one).
    verbose: say what is prepared or reused (off on all but one process of a multi-process run).
    """
    say = print if verbose else (lambda message: None)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    for name, value in [("max_bytes", max_bytes), ("tokenizer_max_bytes", tokenizer_max_bytes)]:
        if value is not None and value <= 0:
            raise DataError(f"{name} must be a positive number of bytes, or None for no limit; got {value}")
    src = open_source(source, dataset=dataset, dataset_config=dataset_config, split=split, text_field=text_field)
    if text_field != "text" and not src.has_fields:
        say(f"note: the text field {text_field!r} (--text-field) does not apply to {src.description}: text files "
            f"are read whole; it names the field of .jsonl / .parquet rows and datasets")
    given = _as_tokenizer(tokenizer)
    if given is not None:
        tokenizer_settings: dict = {"checksum": given.checksum}
    else:
        tokenizer_settings = {"vocab_size": vocab_size, "pattern": pattern_from_name(pattern),
                              "special_tokens": [EOT], "max_bytes": tokenizer_max_bytes}
    corpus = {"format_version": FORMAT_VERSION, "split_rule": SPLIT_RULE, "source": src.identity(),
              "max_bytes": max_bytes, "val_fraction": val_fraction, "errors": errors}
    fingerprint = f"{_digest(corpus)[:12]}-{_digest(tokenizer_settings)[:8]}"
    folder = Path(cache_dir) / f"{src.name}-{fingerprint}"

    found = _find_prepared(folder, given)
    if found is None:
        with _one_preparation_at_a_time(folder, say):
            found = _find_prepared(folder, given)  # made by the process we waited for
            if found is None:
                say(f"preparing {src.description} into {folder}")
                seconds, procs = _build(folder, src, given, {**corpus, "tokenizer": tokenizer_settings}, fingerprint,
                                        num_proc, progress)
                prepared = load_prepared(folder)
                if given is None and prepared.tokenizer.vocab_size < vocab_size:
                    say(f"note: the tokenizer learned {prepared.tokenizer.vocab_size} ids, fewer than the "
                        f"{vocab_size} asked for (--vocab-size): the training text ran out of pairs to merge; give "
                        f"more text for a larger vocabulary")
                meta = prepared.meta
                say(f"prepared {_token_counts(meta)} ({meta['documents']['train']:,} + "
                    f"{meta['documents']['val']:,} documents, {meta['dtype']}); {_throughput(meta, seconds, procs)}")
                return prepared
    prepared = load_prepared(found, expected_checksum=given.checksum if given else None)
    say(f"reusing prepared data in {found} ({_token_counts(prepared.meta)}); delete that folder to prepare it "
        f"again")
    return prepared


def _token_counts(meta: dict) -> str:
    """"9,500 train + 500 val tokens, 5.0% held out": the share of tokens achieved, not the one asked for."""
    train, val = meta["tokens"]["train"], meta["tokens"]["val"]
    return f"{train:,} train + {val:,} val tokens, {100 * val / max(1, train + val):.1f}% held out"


def _throughput(meta: dict, seconds: float, procs: int) -> str:
    """"encoded 1.2 GB in 60.0 s by 16 processes: 20.0 MB/s, 5,000,000 tokens/s" (tokenizer training not counted)."""
    n_bytes, tokens, seconds = sum(meta["bytes"].values()), sum(meta["tokens"].values()), max(seconds, 1e-9)
    return (f"encoded {n_bytes / 1e6:,.1f} MB in {seconds:,.1f} s by {procs} process{'es' * (procs > 1)}: "
            f"{n_bytes / seconds / 1e6:,.2f} MB/s, {tokens / seconds:,.0f} tokens/s")


def load_prepared(folder: str | os.PathLike, expected_checksum: str | None = None) -> PreparedData:
    """Open a prepared-data folder, checking that it is complete and made by the expected tokenizer."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder} holds no prepared data (no {META_FILE}); run the preparation again") from None
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{meta_path} is not valid JSON; delete {folder} and prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{meta_path} is not {FORMAT} version {FORMAT_VERSION} data; delete {folder} and "
                        f"prepare the data again")
    tokenizer_path = folder / TOKENIZER_FILE
    tok = Tokenizer.load(tokenizer_path)
    data_checksum = str(meta.get("tokenizer_checksum"))
    if tok.checksum != data_checksum:
        raise DataError(f"{tokenizer_path} is not the tokenizer these tokens were made with (checksum "
                        f"{tok.checksum[:12]}, data {data_checksum[:12]}); delete {folder} and "
                        f"prepare the data again")
    if expected_checksum is not None and expected_checksum != data_checksum:
        raise DataError(f"the data in {folder} was made with another tokenizer (checksum "
                        f"{data_checksum[:12]}, the one in use is {expected_checksum[:12]}); "
                        f"prepare the data with the tokenizer in use, or use the tokenizer.json of that folder")
    try:
        dtype = np.dtype(meta["dtype"])
        expected_sizes = {split: int(meta["tokens"][split]) * dtype.itemsize for split in SPLITS}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{meta_path} lacks the dtype or token counts; delete {folder} and prepare the data "
                        f"again") from None
    tokens = {}
    for split, expected in expected_sizes.items():
        path = folder / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path} is missing or truncated (expected {expected} bytes); delete {folder} and "
                            f"prepare the data again")
        tokens[split] = np.memmap(path, dtype=dtype, mode="r")
    return PreparedData(folder, tok, tokenizer_path, meta, tokens["train"], tokens["val"])


# ----------------------------------------------------------------------------------------------- building


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def corpus_key(folder: str | os.PathLike) -> str:
    """The part of a prepared-data folder's name that names the corpus and the data settings (the tokenizer's part
    left out): folders with the same key hold the same text, split the same way."""
    return Path(folder).name.rsplit("-", 1)[0]


def _find_prepared(folder: Path, given: Tokenizer | None) -> Path | None:
    """The folder when it is complete; with a given tokenizer, also a folder of the same corpus made by a
    tokenizer trained there with the same checksum (so that resuming with a checkpoint's tokenizer.json finds the
    data prepared when the run began)."""
    if (folder / META_FILE).is_file():
        return folder
    if given is None:
        return None
    same_corpus = corpus_key(folder)
    for candidate in sorted(folder.parent.glob(f"{glob.escape(same_corpus)}-*")):
        try:
            meta = json.loads((candidate / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("tokenizer_checksum") == given.checksum:
            return candidate
    return None


@contextlib.contextmanager
def _one_preparation_at_a_time(folder: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on preparing `folder`, so that processes preparing the same data at once (the ranks
    of a torchrun job, two runs) wait for the first, however long it takes, then reuse its folder.

    Where there are no file locks (Windows), preparations run side by side, which is safe (the first folder
    renamed into place wins) but repeats the work.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock",
                   on_wait=lambda holder: say(f"waiting for another process that is preparing {folder}"
                                              + (f" ({holder})" if holder else ""))):
        yield


def _as_tokenizer(tokenizer: str | os.PathLike | Tokenizer | None) -> Tokenizer | None:
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_file():
        raise DataError(f"no tokenizer file {path}; pass a tokenizer JSON, or none to train one on the data")
    return Tokenizer.load(path)


def _build(folder: Path, src: Source, given: Tokenizer | None, settings: dict, fingerprint: str,
           num_proc: int | None, progress: bool) -> tuple[float, int]:
    """Write the whole folder under a temporary name, then rename it into place; returns the seconds spent
    encoding and writing (after the tokenizer is trained) and the number of encoding processes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        def split_documents() -> Iterator[tuple[str, str]]:
            return _split(_capped(src.documents(settings["errors"]), settings["max_bytes"]),
                          settings["val_fraction"])

        tok = given if given is not None else _train_tokenizer(split_documents(), settings["tokenizer"],
                                                               num_proc, progress)
        tok.save(tmp / TOKENIZER_FILE)
        dtype = token_dtype(tok.vocab_size)
        total = src.total_bytes
        if settings["max_bytes"] is not None:
            total = min(total, settings["max_bytes"]) if total is not None else settings["max_bytes"]
        procs = max(1, min(num_proc or _cpu_count(), (total or 1 << 62) // ENCODE_CHUNK_BYTES))
        started = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="encoding", disable=not progress) as bar:
            chunks = _encode_chunks(_chunk(split_documents()), tok, tmp / TOKENIZER_FILE, procs, dtype)
            counts = _write_splits(tmp, chunks, bar)
        seconds = time.perf_counter() - started
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "dtype": dtype.name,
                "eot_id": tok.eot_id, **counts, "split_rule": SPLIT_RULE, "tokenizer_checksum": tok.checksum,
                "tokenizer_file": TOKENIZER_FILE, "source": src.description, "fingerprint": fingerprint,
                "val_fraction": settings["val_fraction"], "max_bytes": settings["max_bytes"],
                "errors": settings["errors"]}
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same preparation first: theirs is as good as ours
            if not (folder / META_FILE).is_file():
                raise DataError(f"{folder} exists but holds no complete prepared data; delete it and try again"
                                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return seconds, procs


def _write_splits(folder: Path, chunks: Iterable[tuple[str, np.ndarray, int, int]], bar: tqdm) -> dict:
    """Append each chunk's ids to its split's file as it comes; count tokens, bytes and documents per split."""
    counts = {key: dict.fromkeys(SPLITS, 0) for key in ("tokens", "bytes", "documents")}
    files = {split: open(folder / f"{split}.bin", "wb") for split in SPLITS}
    started = time.perf_counter()
    try:
        for split, ids, n_bytes, n_docs in chunks:
            files[split].write(ids.tobytes())
            counts["tokens"][split] += len(ids)
            counts["bytes"][split] += n_bytes
            counts["documents"][split] += n_docs
            tokens = counts["tokens"]["train"] + counts["tokens"]["val"]
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / (time.perf_counter() - started):,.0f} tokens/s",
                                refresh=False)
            bar.update(n_bytes)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    return counts


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete what a killed preparation of this folder on this machine left (its process is gone)."""
    prefix = f".{folder.name}.tmp-{socket.gethostname()}-"
    for tmp in folder.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _cpu_count() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train_tokenizer(split_docs: Iterator[tuple[str, str]], tokenizer_settings: dict, num_proc: int | None,
                     progress: bool) -> Tokenizer:
    train_docs = (doc for split, doc in split_docs if split == "train")
    return Tokenizer.train(_capped(train_docs, tokenizer_settings["max_bytes"]),
                           vocab_size=tokenizer_settings["vocab_size"], pattern=tokenizer_settings["pattern"],
                           special_tokens=tokenizer_settings["special_tokens"], progress=progress,
                           num_proc=num_proc)


def _capped(docs: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The documents up to max_bytes of UTF-8 in all; the one that crosses the limit is cut at a line end."""
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if size == left:
            yield doc
            return
        if size > left:
            head = doc.encode("utf-8")[:left].decode("utf-8", "ignore")
            line_end = head.rfind("\n")
            head = head[:line_end + 1] if 0 <= line_end < len(head) - 1 else head
            if head:
                yield head
            return
        left -= size
        yield doc


def _split(docs: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """Label each document (or piece of one) "train" or "val": the rule is in the module docstring. Holds one
    stretch of about SPLIT_STRETCH_CHARS characters in memory at a time."""
    stretch: list[str] = []
    size = total = 0
    for doc in docs:
        stretch.append(doc)
        size += len(doc)
        if size >= SPLIT_STRETCH_CHARS:
            yield from _split_stretch(stretch, size, val_fraction)
            total += size
            stretch, size = [], 0
    total += size
    if total == 0:
        raise DataError("the corpus has no text (no non-empty documents); point --data at your text")
    if total < 2:
        raise DataError("the corpus is a single character, too little to hold any out for validation; give it "
                        "more text")
    if stretch:
        yield from _split_stretch(stretch, size, val_fraction)


def _split_stretch(docs: list[str], size: int, val_fraction: float) -> Iterator[tuple[str, str]]:
    """The head of the stretch to train, its last val_fraction of characters (at least one, when it has two) to
    validate, cut at the best place near that point."""
    held = min(max(1, round(size * val_fraction)), size - 1)
    if held <= 0:  # a stretch of one character (the end of a longer corpus): nothing to hold out
        yield from (("train", doc) for doc in docs)
        return
    target = size - held
    slack = max(1, held // 4)  # how far from the exact share a better place to cut may be
    lo, hi = max(1, target - slack), min(size - 1, target + slack)
    starts = list(itertools.accumulate((len(doc) for doc in docs), initial=0))
    boundaries = [b for b in starts[1:-1] if lo <= b <= hi]
    if boundaries:
        cut = min(boundaries, key=lambda b: (abs(b - target), b))
    else:  # the window lies inside one document: cut that document
        j = bisect.bisect_right(starts, target) - 1
        cut = starts[j] + _cut_inside(docs[j], target - starts[j], lo - starts[j], hi - starts[j])
    for doc, begin in zip(docs, starts):
        if begin + len(doc) <= cut:
            yield "train", doc
        elif begin >= cut:
            yield "val", doc
        else:
            yield "train", doc[:cut - begin]
            yield "val", doc[cut - begin:]


def _cut_inside(text: str, target: int, lo: int, hi: int) -> int:
    """Where to cut `text` near `target`, within [lo, hi]: after the nearest line end, else before the nearest
    whitespace (which starts the next word's piece), else at the target itself (a character boundary)."""
    for place in _CUT_PLACES:
        cuts = [m.start() for m in place.finditer(text, lo, hi + 1) if m.start() <= hi]
        if cuts:
            return min(cuts, key=lambda cut: (abs(cut - target), cut))
    return target


def _chunk(split_docs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group consecutive documents of the same split into chunks of about ENCODE_CHUNK_BYTES characters."""
    split, docs, size = None, [], 0
    for doc_split, doc in split_docs:
        if docs and (doc_split != split or size >= ENCODE_CHUNK_BYTES):
            yield split, docs
            docs, size = [], 0
        split = doc_split
        docs.append(doc)
        size += len(doc)
    if docs:
        yield split, docs


_worker_tokenizer: Tokenizer | None = None  # each encoding process loads the tokenizer once


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_docs(docs: list[str], dtype: np.dtype, tok: Tokenizer | None = None) -> tuple[np.ndarray, int]:
    """Token ids of the documents, each preceded by EOT, and the UTF-8 bytes they came from."""
    tok = tok or _worker_tokenizer
    ids: list[int] = []
    for doc in docs:
        if tok.eot_id is not None:
            ids.append(tok.eot_id)
        ids += tok.encode_ordinary(doc)
    return np.array(ids, dtype=dtype), sum(len(doc.encode("utf-8")) for doc in docs)


def _encode_chunks(chunks: Iterable[tuple[str, list[str]]], tok: Tokenizer, tokenizer_path: Path, num_proc: int,
                   dtype: np.dtype) -> Iterator[tuple[str, np.ndarray, int, int]]:
    """(split, ids, bytes, documents) per chunk, in corpus order; with num_proc > 1 encoded by a process pool
    that is fed at most 2 chunks per process ahead of the writer, so memory stays bounded."""
    if num_proc == 1:
        for split, docs in chunks:
            yield split, *_encode_docs(docs, dtype, tok), len(docs)
        return
    # the platform's default start method (fork on Linux), so that scripts without a __main__ guard work there
    context = multiprocessing.get_context()
    with context.Pool(num_proc, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
        pending: deque = deque()
        for split, docs in chunks:
            pending.append((split, len(docs), pool.apply_async(_encode_docs, (docs, dtype))))
            if len(pending) >= 2 * num_proc:
                split, n_docs, result = pending.popleft()
                yield split, *result.get(), n_docs
        while pending:
            split, n_docs, result = pending.popleft()
            yield split, *result.get(), n_docs
