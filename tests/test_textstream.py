"""TextStream: streamed text equals the final decoded text, multi-byte characters are never garbled mid-stream."""
import random

import pytest

from minigpt.textstream import TextStream


class ByteVocab:
    """A stand-in tokenizer whose ids are arbitrary byte strings (as BPE tokens are)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


def split_bytes(data: bytes, rng: random.Random):
    """Cut `data` into random runs of 1-3 bytes, ignoring character boundaries."""
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, 3)
        pieces.append(data[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_stream_equals_decode_and_never_shows_replacement_early(seed):
    text = "héllo wörld 🙂 中文字符 ∑ combining e\u0301 \r\n end 🎉"
    pieces = split_bytes(text.encode("utf-8"), random.Random(seed))
    vocab = ByteVocab(pieces)
    stream = TextStream(vocab)
    shown = [stream.push(i) for i in range(len(pieces))]
    shown.append(stream.finish())
    assert "".join(shown) == text == stream.text
    assert all("\ufffd" not in s for s in shown)


def test_incomplete_character_at_the_end_becomes_replacement_like_decode():
    data = "ok 🙂".encode("utf-8")[:-1]  # cut inside the emoji
    vocab = ByteVocab([data[:3], data[3:5], data[5:]])
    stream = TextStream(vocab)
    out = "".join(stream.push(i) for i in range(3)) + stream.finish()
    assert out == data.decode("utf-8", errors="replace")


def test_stop_string_cuts_output_and_is_never_shown_partially():
    vocab = ByteVocab([b"abc", b"<|", b"st", b"op|>", b"more"])
    stream = TextStream(vocab, stop=["<|stop|>"])
    shown = [stream.push(i) for i in range(5)]
    assert shown[0] == "abc"
    assert shown[1] == shown[2] == ""  # could still become the stop string: held back
    assert stream.stopped
    assert "".join(shown) + stream.finish() == "abc" == stream.text


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    vocab = ByteVocab([b"x\n", b"\nEND", b"ing"])
    stream = TextStream(vocab, stop=["\n\n\n"])
    assert stream.push(0) == "x"
    assert stream.push(1) == "\n\nEND"
    assert stream.push(2) == "ing"
    assert not stream.stopped
    assert stream.finish() == ""
    assert stream.text == "x\n\nENDing"
