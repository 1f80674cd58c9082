"""Read UTF-8 text files as a stream of chunks, so a multi-GB corpus is never one string in memory."""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from .errors import TokenizerError
from .patterns import last_safe_cut

BLOCK_BYTES = 1 << 20


def check_readable(path: Union[str, os.PathLike]) -> Path:
    """Fail early, with a fix, when ``path`` is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path} is a directory; pass the files inside it (for example {path}/*.txt)")
    if not path.exists():
        raise TokenizerError(f"input file {path} does not exist; check the path")
    return path


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
    byte offset, unless ``errors="replace"`` (bad bytes become U+FFFD).
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
            try:
                text = carry + decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"{path}: the bytes at offset {offset - pending + e.start} are not valid UTF-8 ({e.reason}); "
                    f"convert the file to UTF-8, or pass --errors replace (errors='replace') to substitute them"
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
