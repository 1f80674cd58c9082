"""Token ids in, printable text out, as generation goes.

A token is a run of bytes, not of characters: one emoji may be split over two tokens, and printing each token's
bytes decoded on its own would show replacement characters for a character that completes one token later.
`TextStream` keeps the unfinished bytes of a character back until the next token completes them, and holds back
text that might be the beginning of a stop string, so that what is printed while streaming is always exactly a
prefix of the final text.
"""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

if TYPE_CHECKING:  # the decoding half of this module needs no torch
    import torch

    from .model import GPT


class _BytesDecoder(Protocol):
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


class TextStream:
    """Feed token ids with `push`; it returns the text that is safe to show now. `finish` returns the rest.

    With stop strings, `stopped` turns True once one appears; the text is cut before it (the stop string itself is
    not part of the output), and further pushes return nothing.
    """

    def __init__(self, tokenizer: _BytesDecoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._held = ""  # decoded text not yet shown: it may be the start of a stop string
        self.text = ""  # everything shown so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(self._tokenizer.decode_bytes([token_id])), final=False)

    def finish(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD, as in `decode(errors="replace")`)."""
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        pending = self._held + new_text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            shown, self._held = pending[:cut], ""
        elif final:
            shown, self._held = pending, ""
        else:
            keep = self._longest_stop_prefix_suffix(pending)
            shown, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += shown
        return shown

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string (it must wait)."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class SampleStream:
    """One sample as text, piece by piece while the model writes it: ``for piece in SampleStream(...): print(piece)``.

    It ends at max_new_tokens (finish_reason "length"), at the tokenizer's end-of-text token ("end_of_text", not
    part of the text) or at a stop string ("stop"). Afterwards `text`, `tokens` (ids generated, the end-of-text id
    not counted) and `finish_reason` describe it. The sampling arguments are those of `generate_tokens`, checked
    here at construction, before anything is generated.
    """

    def __init__(self, model: "GPT", tokenizer, prompt_ids: "torch.Tensor", max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 use_cache: bool = True, generator: "torch.Generator | None" = None, stop: Sequence[str] = (),
                 compile: bool = False) -> None:
        from .generate import generate_tokens

        self._next_ids = generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, use_cache,
                                         generator, stop_id=tokenizer.eot_id, vocab_limit=tokenizer.vocab_size,
                                         compile=compile)
        self._eot_id = tokenizer.eot_id
        self._text = TextStream(tokenizer, stop)
        self.tokens = 0
        self.finish_reason = "length"

    @property
    def text(self) -> str:
        return self._text.text

    def __iter__(self) -> Iterator[str]:
        for next_id in self._next_ids:
            token = int(next_id[0])
            if token == self._eot_id:
                self.finish_reason = "end_of_text"
                break
            self.tokens += 1
            piece = self._text.push(token)
            if piece:
                yield piece
            if self._text.stopped:
                self.finish_reason = "stop"
                break
        tail = self._text.finish()
        if tail:
            yield tail
