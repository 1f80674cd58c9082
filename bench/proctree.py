"""The memory of a process and all of its descendants, read from /proc (Linux only): what the benchmarks that run
their work in a child process (bench_tokenizer_scale.py, bench_prepare.py) sample while it runs.

Two measures: the resident set (RSS), each process's pages counted in full, shared ones in every process that maps
them; and the proportional set (PSS), a shared page divided among the processes that share it, so that a forked
worker's copy of its parent counts once in all.
"""
from __future__ import annotations

import os
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, through each thread's list of children; a process that exits meanwhile
    is left out (with what is below it)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return found


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process (VmRSS, from /proc/PID/statm); 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process in bytes (from /proc/PID/smaps_rollup); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(root: int) -> int:
    """Summed resident bytes of ``root`` and its descendants."""
    return sum(map(rss_bytes, descendants(root)))


def tree_pss(root: int) -> int:
    """Summed proportional set size of ``root`` and its descendants, in bytes."""
    return sum(map(pss_bytes, descendants(root)))
