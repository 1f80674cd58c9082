"""Corpora in, token files out, batches back: sources, preparation (tokenize + split + store) and the loader."""

from data.errors import DataError

__all__ = ["DataError"]
