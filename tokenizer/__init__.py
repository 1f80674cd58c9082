"""Byte-level BPE tokenizer: train, encode, decode, and read/write tiktoken and Hugging Face files.

    from tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=4096)
    ids = tok.encode("hello world"); text = tok.decode(ids)
"""

from .errors import NotATokenIdError, TokenizerError, UnknownTokenError
from .patterns import GPT2_PATTERN, GPT4_PATTERN, pattern_from_name
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "TokenizerError", "UnknownTokenError", "NotATokenIdError", "GPT2_PATTERN", "GPT4_PATTERN",
           "pattern_from_name"]
