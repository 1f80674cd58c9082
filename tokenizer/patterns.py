"""Pre-splitting patterns: the regex that cuts text into pieces before BPE ever sees it.

BPE merges never cross a piece boundary, so the pattern decides what a token *can* be: with these patterns a
token never joins a letter run to a digit run, and spaces attach to the start of the following word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

import regex

from .errors import TokenizerError

# GPT-2's pattern (tiktoken's r50k/p50k form: possessive quantifiers, same pieces as the original).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# GPT-4's pattern (tiktoken's cl100k_base): case-insensitive contractions, digit runs of at most three,
# newlines kept apart from the words that follow them.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same patterns without possessive quantifiers, which Python's `regex` runs about 20% faster. They find exactly
# the same pieces: each dropped possessive ends its alternative (or is followed by something its class excludes),
# so backtracking into it can never produce a different match. tests/test_tokenizer_encode.py checks this.
_FAST_EQUIVALENTS = {
    GPT2_PATTERN: r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s++$|\s+(?!\S)|\s""",
    GPT4_PATTERN: r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s++$|"""
                  r"""\s*[\r\n]|\s+(?!\S)|\s""",
}

# Text that is all ASCII (most code, much English) is split by Python's own `re`, twice as fast as `regex` here,
# with each class spelled out as the ASCII characters `regex` puts in it: \p{L} = A-Za-z, \p{N} = 0-9, \s = \t \n
# \v \f \r and space (`re`'s \s would add \x1c-\x1f). `\s++$` becomes `\s+$` (Python 3.10's `re` has no possessive):
# backtracking could only end a whitespace run before a final newline, which the run itself would include.
# tests/test_tokenizer_trainer.py checks that both give `regex`'s pieces.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_EQUIVALENTS = {
    GPT2_PATTERN: rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+$|[{_WS}]+(?![^{_WS}])|"""
                  rf"""[{_WS}]""",
    GPT4_PATTERN: rf"""'(?:[sdmtSDMT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}|"""
                  rf""" ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]+$|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]""",
}

# A newline between two non-space characters ("x\ny"): both patterns always end a piece right after it, and the
# piece before it ends the same way whether or not the text stops there, so a long text can be cut at such a
# point and pre-split chunk by chunk with exactly the pieces of the whole (used to stream big inputs). Not after
# "  \n" or "\r\n": at the end of a text GPT-2's pattern keeps that whitespace in one piece ("\s++$") but splits
# it before a following word.
_SAFE_CUT = regex.compile(r"(?<=\S)\n(?=\S)")
_LAST_SAFE_CUT = regex.compile(r"(?r)(?<=\S)\n(?=\S)")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def pattern_from_name(name_or_regex: str) -> str:
    """Return the regex for "gpt2" / "gpt4", or validate and return a custom regex."""
    if name_or_regex in PATTERNS:
        return PATTERNS[name_or_regex]
    compile_pattern(name_or_regex)
    return name_or_regex


def fast_equivalent(pattern: str) -> str:
    """The fastest regex we know that splits exactly like ``pattern`` (``pattern`` itself if none)."""
    return _FAST_EQUIVALENTS.get(pattern, pattern)


@lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile a pre-splitting regex, turning a syntax error into a TokenizerError that says how to fix it."""
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError("the split pattern must be a non-empty regex string, or 'gpt2' / 'gpt4'")
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise TokenizerError(f"invalid split pattern {pattern!r}: {e}; pass 'gpt2', 'gpt4' or a valid regex") from None
    if compiled.groups:
        raise TokenizerError(f"split pattern {pattern!r} has a capturing group, which would keep only the group's "
                             f"text of each piece; write (?:...) instead of (...)")
    if compiled.fullmatch("") is not None:
        raise TokenizerError(f"split pattern {pattern!r} matches the empty string; every piece must be non-empty")
    return compiled


# Above this share of extra UTF-8 bytes per character (about 1 character in 100-200 not ASCII) a text goes to
# `regex` whole: the ASCII stretches between its other characters are too short for `re` to win back the cost of
# cutting them out (`python bench/bench_split.py`: Russian- and Chinese-like text, English with curly apostrophes).
MOSTLY_ASCII = 0.01


@lru_cache(maxsize=16)
def splitter(pattern: str) -> Callable[[str], list[str]]:
    """A function that cuts a text into exactly the pieces of ``pattern``'s findall, as fast as we can.

    For the built-in patterns, ASCII text takes Python's `re` (about 2x `regex` here). In a text that is mostly
    ASCII, each other character's stretch between two safe cuts goes to `regex` and the rest to `re`; any other
    text goes to `regex` whole.
    """
    findall = compile_pattern(fast_equivalent(pattern)).findall
    if pattern not in _ASCII_EQUIVALENTS:
        return findall
    ascii_findall = re.compile(_ASCII_EQUIVALENTS[pattern]).findall
    non_ascii, cut_before, cut_after = _NON_ASCII.search, _LAST_SAFE_CUT.search, _SAFE_CUT.search

    def split(text: str) -> list[str]:
        if text.isascii():
            return ascii_findall(text)
        if len(text.encode("utf-8", "surrogatepass")) - len(text) > MOSTLY_ASCII * len(text):
            return findall(text)
        pieces, done = [], 0
        found = non_ascii(text)
        while found is not None:
            before, after = cut_before(text, done, found.start()), cut_after(text, found.start())
            start, end = before.end() if before else done, after.end() if after else len(text)
            pieces += ascii_findall(text[done:start])
            pieces += findall(text[start:end])
            done = end
            found = non_ascii(text, done)
        return pieces + ascii_findall(text[done:])

    return split


def next_safe_cut(text: str, pos: int) -> int:
    """First index >= ``pos`` right after a newline between two non-space characters (len(text) if none)."""
    match = _SAFE_CUT.search(text, max(pos - 1, 0))
    return match.end() if match else len(text)


def last_safe_cut(text: str) -> int:
    """Last index right after a newline between two non-space characters (0 if none)."""
    match = _LAST_SAFE_CUT.search(text)
    return match.end() if match else 0
