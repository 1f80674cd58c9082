"""User-facing errors of the minigpt package, and the one place where CLIs turn them into a one-line message."""
from __future__ import annotations

import os
import sys
from typing import Callable


class MinigptError(Exception):
    """Base of every user error raised by minigpt."""


class ConfigError(MinigptError, ValueError):
    """An invalid setting: names the argument and the allowed range."""


class CheckpointError(MinigptError):
    """A missing, corrupt or mismatched checkpoint."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: user errors become `error: ...` on stderr and exit code 2, never a traceback."""
    from data.errors import DataError
    from tokenizer.errors import TokenizerError

    try:
        code = main()
    except (MinigptError, DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush cannot fail again
        sys.exit(141)
    sys.exit(code or 0)
