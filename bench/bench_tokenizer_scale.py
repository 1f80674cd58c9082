"""Tokenizer training at corpus scale: minigpt against `tokenizers` and rustbpe, each in its own process.

    flock /tmp/minigpt-bench.lock python bench/bench_tokenizer_scale.py   # ~435 MB, vocab 16384, 3 interleaved trials

Prints one side-by-side table: time of the training call (reading the corpus, pre-splitting and counting, merging),
CPU time (user + system, all processes) and peak memory, median and range over the trials, and how many of each
trainer's tokens ours also learned.

**The corpus** (built once, deterministically, under ``--corpus-dir``; never committed): the offline default corpus
(this Python's standard library sources, ``data.sources``) repeated ``--copies`` times (default 33: ~435 MB),
each copy with its words renamed so that the number of distinct pieces keeps growing with the size, as in real text.
In copy ``k`` (0, 1, ...) every ASCII letter run of 3 or more letters ``w`` becomes ``w`` plus the suffix number
``isqrt(k * m(w))`` spelled in letters (0 = no suffix, 1 = "a", 2 = "b", ..., 27 = "aa"; upper case if ``w`` is),
where ``m(w) = 1 + crc32(w) % 16``. So copy 0 is the default corpus itself; a word keeps each spelling for a run of
copies and takes a new one ever less often, at a pace of its own; frequent words stay frequent. Distinct GPT-4 pieces
grow like Heaps' law in natural text (about size^0.7): 64 K in the first 12 MB copy, ~0.33 M at 105 MB, ~0.76 M at
435 MB. Documents are the source files (each copy's files in order); the file holds them separated by NUL
characters (valid Python sources never contain one) and every trainer reads them streamed, 4 MB at a time.

**The trainers**, the same documents, GPT-4 pattern, the same number of merges (vocab minus one special token):
- minigpt: ``Tokenizer.train`` (counting in one process per core, merging in the main process);
- `tokenizers`: its BPE trainer with our pattern as a Split pre-tokenizer, then ByteLevel (as bench_tokenizer.py);
- rustbpe (nanochat's trainer; ``pip install -e .[bench]``): ``train_from_iterator`` with the same pattern.

**Memory** is the peak over the run of the summed resident memory (VmRSS) of the trainer's process and all of its
descendants (ours counts in worker processes, theirs in threads), sampled from /proc every 50 ms, the same way for
all three (Linux only). Trials are interleaved (minigpt, tokenizers, rustbpe, minigpt, ...) so that background load
hurts all alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proctree import tree_rss  # noqa: E402  (bench/, beside this script)

TRAINERS = ("minigpt", "tokenizers", "rustbpe")
SEPARATOR = "\0"
WORD = re.compile(r"([A-Za-z]{3,})")
CORPUS_VERSION = 1  # bump when the construction changes, so that a cached corpus is rebuilt


# ------------------------------------------------------------------------------------------------- the corpus

def suffix(j: int) -> str:
    """1 -> "a", 26 -> "z", 27 -> "aa" (bijective base 26); 0 -> ""."""
    s = ""
    while j:
        j, r = divmod(j - 1, 26)
        s = chr(97 + r) + s
    return s


def build_corpus(path: Path, copies: int) -> None:
    """Write ``copies`` renamed copies of the default corpus to ``path`` (see the module docstring)."""
    from data.sources import iter_documents
    parts = [WORD.split(doc) for doc in iter_documents()]  # [other, word, other, word, ..., other]
    words = sorted({w for p in parts for w in p[1::2]})
    pace = {w: 1 + zlib.crc32(w.encode()) % 16 for w in words}
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for k in range(copies):
            renamed = {}
            for w in words:
                s = suffix(math.isqrt(k * pace[w]))
                renamed[w] = w + (s.upper() if w.isupper() else s)
            for p in parts:
                q = p[:]
                q[1::2] = [renamed[w] for w in p[1::2]]
                f.write("".join(q))
                f.write(SEPARATOR)
            print(f"\rbuilding {path.name}: copy {k + 1}/{copies}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tmp.replace(path)


def corpus_path(corpus_dir: Path, copies: int) -> Path:
    py = ".".join(map(str, sys.version_info[:3]))
    return corpus_dir / f"stdlib-py{py}-x{copies}-v{CORPUS_VERSION}.txt"


def iter_corpus(path: Path, block_chars: int = 1 << 22) -> Iterator[str]:
    """The documents of a corpus file, streamed: memory holds one block, not the file."""
    tail = ""
    with open(path, encoding="utf-8", newline="") as f:
        while block := f.read(block_chars):
            docs = (tail + block).split(SEPARATOR)
            tail = docs.pop()
            yield from docs
    if tail:
        yield tail


# --------------------------------------------------------------------------------------- one trainer (a child)

def train_in_this_process(name: str, corpus: Path, vocab_size: int) -> dict:
    """Train one trainer on the corpus; return its seconds and its tokens (bytes, as hex)."""
    from tokenizer import GPT4_PATTERN
    if name == "minigpt":
        from tokenizer import Tokenizer
        start = time.perf_counter()
        tok = Tokenizer.train(iter_corpus(corpus), vocab_size=vocab_size, progress=False)
        seconds = time.perf_counter() - start
        tokens = list(tok.mergeable_ranks)
    elif name == "tokenizers":
        from bench_tokenizer import hf_train
        from tokenizer.formats import bytes_to_unicode
        start = time.perf_counter()
        hf = hf_train(iter_corpus(corpus), vocab_size)
        seconds = time.perf_counter() - start
        u2b = {c: b for b, c in bytes_to_unicode().items()}
        tokens = [bytes(u2b[c] for c in t) for t in hf.get_vocab() if t != "<|endoftext|>"]
    elif name == "rustbpe":
        import rustbpe
        tok = rustbpe.Tokenizer()
        start = time.perf_counter()
        tok.train_from_iterator(iter_corpus(corpus), vocab_size - 1, pattern=GPT4_PATTERN)  # - 1: no special token
        seconds = time.perf_counter() - start
        tokens = [bytes(t) for t, _ in tok.get_mergeable_ranks()]
    else:
        raise ValueError(name)
    return {"seconds": seconds, "tokens": [t.hex() for t in tokens]}


# --------------------------------------------------------------------------------------- measuring (the parent)

def run_trainer(name: str, corpus: Path, vocab_size: int) -> dict:
    """Run one trainer in a child process; return its seconds, tokens and the peak RSS of its process tree."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        child = subprocess.Popen([sys.executable, __file__, "--child", name, "--corpus", str(corpus),
                                  "--vocab-size", str(vocab_size), "--result", str(out)])
        peak = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.05)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{name} failed (exit code {os.waitstatus_to_exitcode(status)})")
        result = json.loads(out.read_text())
    result["peak_bytes"] = peak
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # its own and its waited-for children's
    return result


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=33, help="renamed copies of the default corpus (33: ~435 MB)")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "minigpt-bench")
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.result.write_text(json.dumps(train_in_this_process(args.child, args.corpus, args.vocab_size)))
        return

    corpus = corpus_path(args.corpus_dir, args.copies)
    if not corpus.exists():
        args.corpus_dir.mkdir(parents=True, exist_ok=True)
        build_corpus(corpus, args.copies)
    size_mb = corpus.stat().st_size / 1e6
    results: dict[str, list[dict]] = {name: [] for name in args.trainers}
    for trial in range(args.trials):
        for name in args.trainers:
            r = run_trainer(name, corpus, args.vocab_size)
            results[name].append(r)
            print(f"trial {trial + 1}: {name} {r['seconds']:.1f} s ({r['cpu_seconds']:.0f} CPU s), "
                  f"{r['peak_bytes'] / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)

    ours = set(results["minigpt"][-1]["tokens"]) if "minigpt" in results else None
    print(f"\n## Training at scale: {corpus.name}, {size_mb:.0f} MB, vocab {args.vocab_size}, GPT-4 pattern, "
          f"{os.cpu_count()} CPUs, median (min-max) of {args.trials} interleaved trials")
    print("| trainer | time s | CPU s | peak memory GB | time vs minigpt | memory vs minigpt | "
          "tokens shared with minigpt |")
    print("|---|---|---|---|---|---|---|")
    base_t = statistics.median(r["seconds"] for r in results["minigpt"]) if ours else None
    base_m = statistics.median(r["peak_bytes"] for r in results["minigpt"]) if ours else None
    for name, runs in results.items():
        t = [r["seconds"] for r in runs]
        m = [r["peak_bytes"] / 1e9 for r in runs]
        cpu = [r["cpu_seconds"] for r in runs]
        tokens = set(runs[-1]["tokens"])
        shared = f"{len(tokens & ours)}/{len(tokens)}" if ours else "-"
        rel_t = f"{statistics.median(t) / base_t:.2f}x" if ours else "-"
        rel_m = f"{statistics.median(m) * 1e9 / base_m:.2f}x" if ours else "-"
        print(f"| {name} | {spread(t, '{:.1f}')} | {spread(cpu, '{:.0f}')} | {spread(m, '{:.2f}')} | {rel_t} | "
              f"{rel_m} | {shared} |")


if __name__ == "__main__":
    main()
