"""The one exception type of the tokenizer package: a user-facing mistake, with a message that says how to fix it."""


class TokenizerError(ValueError):
    """Bad input to the tokenizer (vocab size, corpus, file, special token, id). CLIs print it as one line."""
