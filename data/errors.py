"""The one exception type of the data package: a user-facing mistake, with a message that says how to fix it."""


class DataError(ValueError):
    """Bad or missing corpus, mismatched prepared data. CLIs print it as one line."""
