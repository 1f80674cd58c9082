"""Where documents come from: a corpus in, documents (str) out, one at a time.

Every kind of source is streamed, so a corpus larger than RAM goes through in bounded memory.

Kinds of source (`iter_documents(source, dataset=...)`, or `open_source` for the same plus size and identity):

- **a text file** (any suffix other than `.jsonl` / `.parquet`);
- **a folder**: every non-hidden file below it, recursively, in sorted path order (so the corpus, its split and
  its tokens are the same on every machine). Files that look binary (a NUL byte in their first 8 KiB, the test
  git uses) are skipped, and each file is read by its suffix as below;
- **a glob** such as `"books/**/*.txt"` (quote it so that the shell leaves it alone): the matching files, sorted;
- **`.jsonl`**: one JSON object per line, the document is its `text_field` (default `"text"`);
- **`.parquet`**: the `text_field` column, read in record batches through pyarrow (which `datasets` depends on);
- **a Hugging Face dataset** (`dataset="NAME"`, with `dataset_config`, `split` and `text_field`) through
  `datasets.load_dataset(..., streaming=True)`, so nothing is downloaded in full before training starts; a folder
  written by `Dataset.save_to_disk` is read with `datasets.load_from_disk`. With both `dataset` and `source`,
  `source` names the data files of a builder, e.g. `dataset="json", source="shards/*.jsonl"`.

What a document is: a file up to 1 MiB is one document (a book, a source file, an article). A larger text file is
taken to be many texts run together, and is cut into documents of 64-128 KiB, at a blank line where there is one
(else at a line end), so that memory stays bounded however big the file. The pieces of a file join back to exactly
its text. A `.jsonl` line, a Parquet row or a dataset row is one document. Empty documents are skipped.

**The offline default corpus** (`source=None, dataset=None`): the `.py` sources of the standard library of the
Python running this code (`sysconfig.get_paths()["stdlib"]`), leaving out `site-packages`/`dist-packages` and the
test folders (`test`, `tests`, `idle_test`). Every Python installation has it, so the default run needs no
download: about 730 files and 12 MB for CPython 3.11, one document per file, in sorted path order. It is read
with `errors="replace"`, so that an odd file on some installation never stops the default run.
`default_corpus_description()` says which files these are on this machine.

Text is UTF-8. A byte that is not raises a DataError naming the file and the byte offset; `errors="replace"`
(`--errors replace` in the CLI) substitutes U+FFFD instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError
from tokenizer.textfiles import folder_files, not_text_hint, without_binary

WHOLE_FILE_MAX_BYTES = 1 << 20  # a text file up to this size is one document
DOC_BYTES = 1 << 16  # a larger file is cut into documents of DOC_BYTES to 2 * DOC_BYTES
ERROR_MODES = ("strict", "replace", "ignore")

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Source:
    """A resolved corpus: what it is (for people and for the cache fingerprint) and how to read it."""

    kind: str  # "default", "files", "dataset" (load_dataset) or "saved" (load_from_disk)
    name: str  # short, file-name-safe: names the prepared-data folder
    description: str
    files: tuple[Path, ...] = ()
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files_given: bool = False  # dataset builder ("json", "parquet", ...) reading `files`

    @property
    def total_bytes(self) -> int | None:
        """About the bytes of text, for the progress bar: the size of the files, or None where that says little
        (a dataset, compressed Parquet)."""
        if self.kind not in ("default", "files") or any(path.suffix == ".parquet" for path in self.files):
            return None
        return sum(path.stat().st_size for path in self.files)

    @property
    def has_fields(self) -> bool:
        """Whether `text_field` means anything here: a dataset, or .jsonl / .parquet files among the files."""
        return self.kind in ("dataset", "saved") or any(p.suffix in (".jsonl", ".parquet") for p in self.files)

    def identity(self) -> dict:
        """What makes two corpora the same, cheaply: paths, sizes and modification times, or the dataset's name.

        A hub dataset is known only by name, config, split and field: if it changes upstream, delete the
        prepared-data folder to see the new version.
        """
        files = [[str(path.resolve()), st.st_size, st.st_mtime_ns] for path in self.files for st in [path.stat()]]
        return {
            "kind": self.kind,
            "files": files,
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "text_field": self.text_field,
        }

    def documents(self, errors: str = "strict") -> Iterator[str]:
        """Stream the documents; `errors` is how to treat bytes that are not UTF-8 ("strict", "replace", "ignore")."""
        if errors not in ERROR_MODES:
            raise DataError(f"unknown errors mode {errors!r}; use one of {', '.join(ERROR_MODES)}")
        if self.kind == "default":
            docs = (doc for path in self.files for doc in _text_file_documents(path, "replace"))
        elif self.kind == "files":
            docs = (doc for path in self.files for doc in _file_documents(path, self.text_field, errors))
        else:
            docs = _dataset_documents(self)
        return (doc for doc in docs if doc)


def open_source(
    source: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Source:
    """Resolve a corpus without reading it: which files (or which dataset), a name and a description."""
    if dataset is not None:
        return _dataset_source(source, dataset, dataset_config, split, text_field)
    if source is None:
        files = _stdlib_files()
        return Source("default", f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}",
                      _describe_default(files), files)
    files, what = _resolve_files(str(source))
    return Source("files", _source_name(str(source)), f"{what} ({_count_and_size(files)})", files,
                  text_field=text_field)


def iter_documents(
    source: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    errors: str = "strict",
) -> Iterator[str]:
    """Stream the documents of a corpus (see the module docstring for the kinds and what a document is).

    With neither `source` nor `dataset`, the offline default corpus: the Python standard library's sources.
    """
    src = open_source(source, dataset=dataset, dataset_config=dataset_config, split=split, text_field=text_field)
    return src.documents(errors)


def default_corpus_description() -> str:
    """One line saying what the offline default corpus is on this machine (files, size, where)."""
    return _describe_default(_stdlib_files())


# ----------------------------------------------------------------------------------------------- resolving files


def _resolve_files(source: str) -> tuple[tuple[Path, ...], str]:
    path = Path(source).expanduser()
    if path.is_file():
        return (path,), f"file {path}"
    if path.is_dir():
        files, skipped = _text_only(folder_files(path))
        if not files:
            raise DataError(f"folder {path} has no text files; put .txt/.jsonl/.parquet files in it or pass a file")
        return files, f"folder {path}{skipped}"
    if glob.has_magic(source):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files, skipped = _text_only([p for p in matches if p.is_file()])
        if not files:
            raise DataError(f"no text files match {source!r}; check the pattern (quote it, use ** for subfolders)")
        return files, f"files matching {source!r}{skipped}"
    raise DataError(f"no such file or folder: {source}; pass a text file, a folder, a glob, a .jsonl or "
                    f".parquet file, or a dataset name with --dataset")


def _text_only(paths: list[Path]) -> tuple[tuple[Path, ...], str]:
    """The text files among paths, and a note saying how many binary ones were left out."""
    files = without_binary(paths)
    skipped = len(paths) - len(files)
    return files, f", {skipped} binary file{'s' if skipped != 1 else ''} skipped" if skipped else ""


def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).parts)
    if not found:
        raise DataError(f"found no Python sources under {root} for the default corpus; pass your own data with --data")
    return tuple(found)


def _describe_default(files: tuple[Path, ...]) -> str:
    root = sysconfig.get_paths()["stdlib"]
    return (f"the Python {sys.version.split()[0]} standard library's own source: {_count_and_size(files)} of .py "
            f"under {root} (no site-packages, no tests)")


def _count_and_size(files: tuple[Path, ...]) -> str:
    size = sum(p.stat().st_size for p in files)
    return f"{len(files)} file{'s' if len(files) != 1 else ''}, {size / 1e6:.1f} MB"


def _source_name(source: str) -> str:
    """"books" for books/, books.txt or books/**/*.txt: what names the prepared-data folder."""
    path = Path(source).expanduser()
    while glob.has_magic(path.name):
        path = path.parent
    return _safe_name(path.resolve().name.split(".")[0])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:40] or "corpus"


# ----------------------------------------------------------------------------------------------- reading files


def _file_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field, errors)
    if path.suffix == ".parquet":
        return _parquet_documents(path, text_field, errors)
    return _text_file_documents(path, errors)


def _decode(raw: bytes, path: Path, offset: int, errors: str) -> str:
    """UTF-8 decode, or a DataError that says where the first bad byte is and how to get past it."""
    hint = not_text_hint(path, raw) if offset == 0 else None
    if hint:  # an archive: neither converting nor --errors replace would help
        raise DataError(f"{path} {hint}")
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 at byte offset {offset + e.start} "
                        f"(byte 0x{raw[e.start]:02x}); convert the file to UTF-8, or pass errors=\"replace\" "
                        f"(--errors replace) to read bad bytes as U+FFFD") from None


def _text_file_documents(path: Path, errors: str) -> Iterator[str]:
    """A file up to WHOLE_FILE_MAX_BYTES is one document; a larger one is cut into documents (module docstring)."""
    with open(path, "rb") as f:
        if path.stat().st_size <= WHOLE_FILE_MAX_BYTES:
            yield _decode(f.read(), path, 0, errors).removeprefix("\ufeff")
            return
        pending, offset, eof = bytearray(), 0, False
        while pending or not eof:
            while not eof and len(pending) <= 2 * DOC_BYTES:
                block = f.read(DOC_BYTES)
                eof = not block
                pending += block
            cut = len(pending) if eof and len(pending) <= 2 * DOC_BYTES else _cut_point(pending)
            text = _decode(bytes(pending[:cut]), path, offset, errors)
            yield text.removeprefix("\ufeff") if offset == 0 else text
            del pending[:cut]
            offset += cut


def _cut_point(buf: bytearray) -> int:
    """Where to end a document that starts at buf[0]: after the first blank line past DOC_BYTES, else after the
    last line end before 2 * DOC_BYTES, else at 2 * DOC_BYTES moved back so that no UTF-8 character is split.
    The caller guarantees len(buf) > 2 * DOC_BYTES."""
    lo, hi = DOC_BYTES, 2 * DOC_BYTES
    blank = _BLANK_LINE.search(buf, lo, hi)
    if blank:
        return blank.end()
    newline = buf.rfind(b"\n", lo, hi)
    if newline != -1:
        return newline + 1
    cut = hi
    while cut > lo and buf[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the character started earlier
        cut -= 1
    return cut


def _jsonl_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    with open(path, "rb") as f:
        offset = 0
        for line_no, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no} is not JSON ({e.msg}); a .jsonl file holds one JSON "
                                f"object per line") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(map(repr, row)) if isinstance(row, dict) else "none: not an object"
                raise DataError(f"{path} line {line_no} has no field {text_field!r} (fields: {fields}); "
                                f"name the text field with --text-field")
            yield _as_text(row[text_field], f"{path} line {line_no}", text_field)


def _parquet_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`; imported here because it is slow to import

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"cannot read {path} as Parquet ({_first_line(e)}); check the file") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(map(repr, names))}); "
                        f"name the text column with --text-field")
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):  # a binary column: decode it like a file
                value = _decode(value, Path(f"{path} row {row}"), 0, errors)
            yield _as_text(value, f"{path} row {row}", text_field)


def _as_text(value: object, where: str, text_field: str) -> str:
    """A missing (null) text is an empty document; anything but a string is a mistake in the field name."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text; "
                        f"name the text field with --text-field")
    return value


# ----------------------------------------------------------------------------------------------- datasets


def _dataset_source(source, dataset: str, config: str | None, split: str, text_field: str) -> Source:
    kind, files, what = "dataset", (), f"Hugging Face dataset {dataset!r}"
    folder = Path(dataset).expanduser()
    if source is not None:  # the data files of a builder such as "json", "parquet" or "text"
        files, found = _resolve_files(str(source))
        what += f" on {found}"
    elif (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        kind, what = "saved", f"saved dataset {folder}"  # written by save_to_disk
    if folder.is_dir() and source is None:  # a local dataset folder: its files are its identity
        files = tuple(p for p in sorted(folder.rglob("*")) if p.is_file())
    what += "".join(f", {k} {v!r}" for k, v in [("config", config), ("split", split), ("field", text_field)] if v)
    name = _safe_name(Path(dataset.rstrip("/")).name + (f"-{config}" if config else ""))
    return Source(kind, name, what, files, dataset, config, split, text_field, data_files_given=source is not None)


def _dataset_documents(src: Source) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("the `datasets` package is needed for --dataset; pip install datasets") from None
    try:
        if src.kind == "saved":
            rows = datasets.load_from_disk(str(Path(src.dataset).expanduser()))
            if isinstance(rows, datasets.DatasetDict):
                if src.split not in rows:
                    raise DataError(f"saved dataset {src.dataset} has no split {src.split!r} "
                                    f"(splits: {', '.join(rows)}); choose another split")
                rows = rows[src.split]
        else:
            data_files = [str(p) for p in src.files] if src.data_files_given else None
            rows = datasets.load_dataset(src.dataset, src.dataset_config, split=src.split,
                                         data_files=data_files, streaming=True)
        for index, row in enumerate(rows):
            if src.text_field not in row:
                raise DataError(f"dataset {src.dataset} has no field {src.text_field!r} (fields: "
                                f"{', '.join(map(repr, row))}); name the text field with --text-field")
            yield _as_text(row[src.text_field], f"dataset {src.dataset} row {index}", src.text_field)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (hub offline, no such config, bad files): one line for all
        raise DataError(f"could not read dataset {src.dataset!r} ({_first_line(e)}); check the name, "
                        f"--dataset-config and the network, or pass local files with --data") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
