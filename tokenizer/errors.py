"""The one exception type of the tokenizer package: a user-facing mistake, with a message that says how to fix it."""


class TokenizerError(ValueError):
    """Bad input to the tokenizer (vocab size, corpus, file, special token, id). CLIs print it as one line."""


class UnknownTokenError(TokenizerError, KeyError):
    """An id or token bytes that this vocabulary does not have. Also a KeyError, because tiktoken raises KeyError
    there (``decode``, ``encode_single_token``, ``decode_single_token_bytes``, ``eot_token``) and code written for
    it catches that."""

    __str__ = TokenizerError.__str__  # the message as it is, not quoted as KeyError quotes its key


class NotATokenIdError(TokenizerError, TypeError):
    """An id that is not an integer (a string, a float). Also a TypeError, because tiktoken raises TypeError there."""
