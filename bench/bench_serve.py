"""Serving speed: `python -m minigpt.serve` driven by the official `openai` client, against sample.py, on a
GPT-2-124M-shaped model (random weights: the compute of the real ones).

    flock /tmp/minigpt-bench.lock python bench/bench_serve.py [--trials 5] [--clients 16] [--tokens 48]
    python bench/bench_serve.py --quick          # a toy model, a few seconds: checks that every part runs

One server process runs throughout; trials are interleaved (sample.py, one lone client, N clients at once, the
in-process batch reference, then again), medians and spread reported:
- sample.py: its own tokens/s for one sample (--json "seconds"; median of samples 2..4 of one run, the first
  paying for warm-up), the model loaded by sample.py itself;
- one lone client: a streamed completion of --tokens tokens (ignore_eos, so every request writes exactly that
  many); tokens/s = tokens / request time, and the time to the first token (TTFT); measured just before and
  just after sample.py, and averaged, so that a load that comes and goes weighs on both alike;
- N clients at once (threads, each one streamed request, released together): aggregate tokens/s = all tokens /
  (last end - first start), and each request's TTFT, whose p50 and p99 over all trials are reported;
- the reference: GPT.generate in this process at batch N against batch 1 (what batching can give at most).
Targets (issue 16): N=16 clients get >= 4.5x the lone client's tokens/s; the lone client >= 0.9x sample.py's.

The model's vocabulary has GPT-2's 50257 rows; the tokenizer is a small BPE trained here (1024 ids), so sampling
chooses among those ids while every step still computes all 50257 logits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.checkpoint import has_checkpoint, load_model, save_checkpoint  # noqa: E402

SIZES = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "quick": dict(vocab_size=2048, block_size=256, n_layer=2, n_head=4, n_embd=64),
}
PROMPT = "The old lighthouse keeper climbed the stairs every evening to light the lamp, and"


def make_checkpoint(folder: Path, size: dict) -> Path:
    """A random GPT-2-shaped model (learned positions, tanh GELU, tied head) with a 1024-id tokenizer, saved as
    train.py saves one; reused when it is already there."""
    if has_checkpoint(folder):
        return folder
    from tokenizer import Tokenizer

    text = Path(__file__).read_text(encoding="utf-8") + (ROOT / "README.md").read_text(encoding="utf-8")
    tok = Tokenizer.train([text], vocab_size=1024, special_tokens=["<|endoftext|>"], progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**size, positions="learned", activation="gelu_tanh"))
    save_checkpoint(folder, model, tok, {"model": model.config.to_dict(), "train": {}, "step": 0})
    return folder


def start_server(folder: Path, log: Path, clients: int, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.serve", str(folder), "--port", "0", "--max-batch",
                             str(clients), "--threads", str(threads)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"at (http://\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.read_text()}")


def sample_py(folder: Path, tokens: int, threads: int) -> float:
    """sample.py's tokens/s for one sample: the median of samples 2..4 of one run."""
    out = subprocess.run([sys.executable, "sample.py", "--out-dir", str(folder), "--prompt", PROMPT, "--json",
                          "--max-new-tokens", str(tokens), "--temperature", "1", "--num-samples", "4"],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    samples = json.loads(out.stdout)["samples"][1:]
    return statistics.median(s["tokens"] / s["seconds"] for s in samples)


def streamed(client, model: str, tokens: int) -> tuple[float, float, float, int]:
    """(start, first token, end) times and the token count of one streamed completion."""
    start = time.perf_counter()
    first = None
    chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=1.0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    count = 0
    for chunk in chunks:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage:
            count = chunk.usage.completion_tokens
    end = time.perf_counter()
    return start, first if first is not None else end, end, count


def lone(client, model: str, tokens: int) -> tuple[float, float]:
    """(tokens/s, TTFT) of one client alone."""
    start, first, end, count = streamed(client, model, tokens)
    return count / (end - start), first - start


def together(client, model: str, tokens: int, clients: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, every request's TTFT) of `clients` streamed requests released at once."""
    barrier = threading.Barrier(clients)
    results: list = [None] * clients

    def one(i: int) -> None:
        barrier.wait()
        results[i] = streamed(client, model, tokens)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    begin, finish = min(r[0] for r in results), max(r[2] for r in results)
    return sum(r[3] for r in results) / (finish - begin), [r[1] - r[0] for r in results]


def batch_reference(model: GPT, tokens: int, clients: int) -> tuple[float, float]:
    """GPT.generate's tokens/s at batch 1 and at batch `clients` (the same prompt repeated)."""

    idx = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    speeds = []
    for batch in (1, clients):
        start = time.perf_counter()
        model.generate(idx.repeat(batch, 1), tokens, temperature=1.0, generator=0)
        speeds.append(batch * tokens / (time.perf_counter() - start))
    return speeds[0], speeds[1]


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials (medians and ranges reported)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (and the server's --max-batch)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens each request writes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server, sample.py and here")
    parser.add_argument("--quick", action="store_true", help="a toy model and 1 trial: checks that every part runs")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="where the random model is saved (and reused); default /tmp/minigpt-bench-serve-SIZE")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    args = parser.parse_args()
    import openai

    size_name = "quick" if args.quick else "gpt2"
    trials = 1 if args.quick else args.trials
    torch.set_num_threads(args.threads)
    folder = make_checkpoint(args.checkpoint or Path(f"/tmp/minigpt-bench-serve-{size_name}"), SIZES[size_name])
    model = load_model(folder)[0]
    log = folder / "server.log"
    proc, url = start_server(folder, log, args.clients, args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads ({os.cpu_count()} CPUs visible), model {size_name} "
          f"({model.num_parameters() / 1e6:.0f}M parameters), {args.clients} clients x {args.tokens} tokens, "
          f"{trials} interleaved trials; server at {url}", flush=True)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model_id = client.models.list().data[0].id
        lone(client, model_id, 4)  # warm-up: the first request pays for allocations
        together(client, model_id, 4, args.clients)
        rows: dict[str, list] = {k: [] for k in ("sample", "lone", "lone_ttft", "together", "ttft", "ref1", "refN")}
        for trial in range(trials):
            before = lone(client, model_id, args.tokens)
            rows["sample"].append(sample_py(folder, args.tokens, args.threads))
            after = lone(client, model_id, args.tokens)
            rows["lone"].append((before[0] + after[0]) / 2)
            rows["lone_ttft"] += [before[1], after[1]]
            speed, ttfts = together(client, model_id, args.tokens, args.clients)
            rows["together"].append(speed)
            rows["ttft"] += ttfts
            ref1, refn = batch_reference(model, args.tokens, args.clients)
            rows["ref1"].append(ref1)
            rows["refN"].append(refn)
            print(f"  trial {trial + 1}: sample.py {rows['sample'][-1]:.1f}, lone {rows['lone'][-1]:.1f}, "
                  f"{args.clients} together {rows['together'][-1]:.1f} tokens/s; generate batch 1 {ref1:.1f}, "
                  f"batch {args.clients} {refn:.1f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    n = args.clients
    gain = [t / s for t, s in zip(rows["together"], rows["lone"])]
    lone_vs_sample = [s / b for s, b in zip(rows["lone"], rows["sample"])]
    ref_gain = [b / a for a, b in zip(rows["ref1"], rows["refN"])]
    print(f"\n{'':34s} median (range) over {trials} trials")
    print(f"{'sample.py, tokens/s':34s} {spread(rows['sample'])}")
    print(f"{'lone client, tokens/s':34s} {spread(rows['lone'])}   TTFT {spread(rows['lone_ttft'], '{:.3f}')} s")
    print(f"{f'{n} clients together, tokens/s':34s} {spread(rows['together'])}   TTFT p50 "
          f"{percentile(rows['ttft'], 50):.3f} s, p99 {percentile(rows['ttft'], 99):.3f} s ({len(rows['ttft'])} requests)")
    print(f"{f'{n} together / lone':34s} {spread(gain, '{:.2f}')}x   (target >= 4.5x)")
    print(f"{'lone client / sample.py':34s} {spread(lone_vs_sample, '{:.2f}')}x   (target >= 0.9x)")
    print(f"{f'GPT.generate batch {n} / batch 1':34s} {spread(ref_gain, '{:.2f}')}x   (the most batching gives here; "
          f"batch 1 {spread(rows['ref1'])} tokens/s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
