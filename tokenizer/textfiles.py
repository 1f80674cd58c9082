"""Read UTF-8 text files as a stream of chunks, so a multi-GB corpus is never one string in memory; find the text
files of a folder or glob (the same way `data/sources.py` does for train.py); say what a file that is not text is."""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from .errors import TokenizerError
from .patterns import last_safe_cut

BLOCK_BYTES = 1 << 20
_BINARY_SNIFF_BYTES = 8192
# What a file that is not text is, by its first bytes, and what to do about it ({path} is filled in).
_NOT_TEXT = [
    (b"\x1f\x8b", "is gzip-compressed, not text; decompress it first (gunzip -k {path})"),
    (b"BZh", "is bzip2-compressed, not text; decompress it first (bunzip2 -k {path})"),
    (b"\xfd7zXZ\x00", "is xz-compressed, not text; decompress it first (unxz -k {path})"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed, not text; decompress it first (unzstd {path})"),
    (b"PK\x03\x04", "is a zip archive, not text; extract it first (unzip {path}) and pass the folder"),
    (b"PAR1", "is a Parquet file, not text; name it .parquet and pass it to train.py --data, which reads its text "
              "column"),
]


def not_text_hint(path: Union[str, os.PathLike], head: bytes) -> str | None:
    """"is gzip-compressed, not text; decompress it first (...)" when the first bytes of a file say it is an
    archive or a Parquet file (and are not UTF-8 text), where reading bad bytes as U+FFFD would only make garbage
    and "convert it to UTF-8" would not help; else None."""
    head = head[:_BINARY_SNIFF_BYTES]
    try:
        if b"\0" not in head and codecs.getincrementaldecoder("utf-8")().decode(head) is not None:
            return None  # valid UTF-8 (the last character may be cut): text that merely starts like an archive
    except UnicodeDecodeError:
        pass
    for magic, hint in _NOT_TEXT:
        if head.startswith(magic):
            return hint.format(path=path)
    return None


def check_readable(path: Union[str, os.PathLike]) -> Path:
    """Fail early, with a fix, when ``path`` is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path} is a directory; pass the files inside it (for example {path}/*.txt)")
    if not path.exists():
        raise TokenizerError(f"input file {path} does not exist; check the path")
    return path


def input_files(source: Union[str, os.PathLike]) -> list[Path]:
    """The files a path names, as train.py --data reads them: a file; every non-hidden file below a folder, in
    sorted path order, binary ones skipped; or the files matching a glob (``~`` expanded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = list(without_binary(folder_files(path)))
        if not files:
            raise TokenizerError(f"folder {path} has no text files; put UTF-8 text files in it or pass a file")
        return files
    if not path.exists() and glob.has_magic(str(source)):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(source)), recursive=True))
        files = list(without_binary([p for p in matches if p.is_file()]))
        if not files:
            raise TokenizerError(f"no text files match {str(source)!r}; check the pattern (quote it, use ** for "
                                 f"subfolders)")
        return files
    return [check_readable(path)]


def folder_files(root: Path) -> list[Path]:
    """Every non-hidden file below ``root`` (hidden folders skipped), sorted by path, the same on every machine."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    found.sort(key=lambda p: p.relative_to(root).parts)
    return [p for p in found if p.is_file()]


def without_binary(paths: list[Path]) -> tuple[Path, ...]:
    """The paths that are not binary files: a NUL byte in the first 8 KiB, the test git uses (.parquet is kept:
    it is binary by design, and read by its suffix)."""
    return tuple(p for p in paths if p.suffix == ".parquet" or not _looks_binary(p))


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF_BYTES)


def decode_utf8(raw: bytes, source: str) -> str:
    """Decode UTF-8 strictly; invalid bytes raise TokenizerError naming ``source`` and the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{source}: the bytes at offset {e.start} are not valid UTF-8 ({e.reason}); "
                             f"convert the text to UTF-8") from None


def iter_file_text(path: Union[str, os.PathLike], errors: str = "strict",
                   block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """Yield the text of a UTF-8 file in chunks of about ``block_bytes``.

    Chunks end at a newline between two non-space characters, where pre-splitting chunk by chunk gives the same
    pieces as the whole file (GPT-2/GPT-4 patterns). A file without such newlines for 16 blocks (say, CR LF line
    ends only) is cut anyway, which may change one piece per cut. Invalid UTF-8 raises TokenizerError naming the
    byte offset, unless ``errors="replace"`` (bad bytes become U+FFFD) or ``"ignore"`` (they are dropped).
    """
    path = check_readable(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0  # file offset of the next block
    carry = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            final = not block
            pending = len(decoder.getstate()[0])
            hint = not_text_hint(path, block) if offset == 0 else None
            if hint:
                raise TokenizerError(f"{path} {hint}")
            try:
                text = carry + decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"{path}: the bytes at offset {offset - pending + e.start} are not valid UTF-8 ({e.reason}); "
                    f"convert the file to UTF-8, or pass --errors replace (errors='replace') to read them as U+FFFD"
                ) from None
            offset += len(block)
            if final:
                if text:
                    yield text
                return
            cut = last_safe_cut(text)
            if cut == 0 and len(text) > 16 * block_bytes:  # no newline for a long stretch: cut anyway
                cut = len(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
