"""One process at a time: an exclusive lock on a file, held while a folder is being written.

Used for a prepared-data folder (the ranks of a torchrun job wait for the one that prepares it) and for a run's
output folder (a second run refuses to write into it). POSIX `flock`, so the lock dies with its process: a
killed run never leaves a folder locked. Where there is no `flock` (Windows) there is no lock.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class LockHeld(Exception):
    """The lock is held by another process; `holder` says which ("pid 123 on host", or "" if not yet written)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, and removed on release) for the body of the `with`.

    When another process holds it: wait for it (calling `on_wait(holder)` first) or, with wait=False, raise
    LockHeld. The holder writes "pid N on HOST" into the file, so that the one refused can name it. OSError
    (a folder that cannot be written) passes through.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    while True:
        lock = open(path, "a+")  # closing it releases the lock
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(path)
                if not wait:
                    raise LockHeld(path, holder) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(lock, fcntl.LOCK_EX)
            # The holder we waited for removes the file on release: the lock we got may be on a file that no
            # longer has this name, while a newcomer locks a new file under it. Then take the new one.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(lock.fileno()).st_ino:
                continue
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
            lock.flush()
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # while still holding it (see above)
            return
        finally:
            lock.close()


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
