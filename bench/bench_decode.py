"""Batch-1 decoding, eager against compiled (sample.py --compile: CUDA graphs on a GPU), in tokens/s.

    python bench/bench_decode.py --device cuda                         # GPT-2 124M's shape, bfloat16 (autocast)
    python bench/bench_decode.py --device cuda --positions learned alibi rope sinusoidal --json decode.json
    python bench/bench_decode.py --smoke                               # a tiny shape on the CPU: every part runs

The model has random weights (the compute of trained ones). Each run is `generate.generate_tokens` as sample.py
calls it: greedy, --new-tokens tokens after a prompt of --prompt-tokens random ids, batch 1. Its speed is that
of the decoding steps: the tokens after the first, over the time from the first token (which the prompt's
prefill gives) to the last. Runs are interleaved (eager, compiled, eager, ...) after one warm-up of each (the
compiled one's time, compilation and CUDA graph recording included, is reported as compile_s); medians and
spread over --trials. The eager and the compiled tokens are compared: equal in float32; in bfloat16 a near-tie
of a random model's logits may go either way (fused kernels round differently), so a difference is reported,
not fatal. On a CPU there are no CUDA graphs: compiled means inductor's C++ kernels only.

`measure_decoding(model, ...)` is the function bench_gpu.py calls for its decoding section.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.generate import generate_tokens  # noqa: E402

GPT2_124M = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, activation="gelu_tanh")
SMOKE = dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64)


def decode_once(model: GPT, idx: torch.Tensor, new_tokens: int, compile: bool,
                dtype: torch.dtype | None) -> tuple[float, float, list[list[int]]]:
    """(seconds to the first token, seconds of the decoding steps after it, the tokens of every row)."""
    device = idx.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        started = time.perf_counter()
        steps = generate_tokens(model, idx, new_tokens, temperature=0, compile=compile)
        tokens = [next(steps)]
        first = time.perf_counter()
        tokens += list(steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
    return first - started, ended - first, torch.stack(tokens, dim=1).tolist()


def measure_decoding(model: GPT, *, new_tokens: int = 256, prompt_tokens: int = 16, trials: int = 3,
                     dtype: torch.dtype | None = None, batch: int = 1, seed: int = 0) -> dict:
    """Decoding tokens/s of `model` (in eval mode, on its device) eager and compiled, batch `batch`, in autocast
    `dtype` (None: the weights' own). Returns a JSON-ready dict: per mode the median tokens/s and its spread
    (min, max) over `trials` interleaved runs, the speedup (compiled median / eager median), compile_s (the
    first compiled run: compilation, CUDA graph recording and its decoding), same_tokens and first_difference
    (the step where the greedy tokens part, or None), graphs (torch.compile's count) and cuda_graphs (whether
    every compiled graph was replayed as a CUDA graph; False on a CPU)."""
    from torch._dynamo.utils import counters

    device = model.wte.weight.device
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator).to(device)
    counters.clear()
    decode_once(model, idx, new_tokens, False, dtype)  # warm-up: kernels loaded, allocator primed
    compile_first, compile_rest, _ = decode_once(model, idx, new_tokens, True, dtype)
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    tokens: dict[str, list] = {}
    for _ in range(trials):
        for mode in seconds:
            _, decoding, tokens[mode] = decode_once(model, idx, new_tokens, mode == "compiled", dtype)
            seconds[mode].append(decoding)
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch.") if dtype else None, "batch": batch,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "trials": trials}
    for mode, times in seconds.items():
        speeds = sorted(batch * (new_tokens - 1) / t for t in times)
        result[mode] = {"tokens_per_sec": statistics.median(speeds), "spread": [speeds[0], speeds[-1]]}
    result["speedup"] = result["compiled"]["tokens_per_sec"] / result["eager"]["tokens_per_sec"]
    result["compile_s"] = compile_first + compile_rest
    differences = [step for row_e, row_c in zip(tokens["eager"], tokens["compiled"])
                   for step, (e, c) in enumerate(zip(row_e, row_c)) if e != c]
    result["same_tokens"] = not differences
    result["first_difference"] = min(differences) if differences else None
    result["graphs"] = counters["stats"]["unique_graphs"]
    result["cuda_graphs"] = device.type == "cuda" and not counters["inductor"]["cudagraph_skips"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--positions", nargs="+", default=["learned"], choices=["learned", "sinusoidal", "alibi", "rope"])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-layer", type=int, default=None, help="override GPT-2 124M's shape (with the two below)")
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (a shared CPU: fewer, steadier)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, few tokens: every part runs")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SMOKE if args.smoke else GPT2_124M)
    shape.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)})
    device = torch.device("cpu" if args.smoke else args.device)
    if args.smoke:
        args.new_tokens = 24
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; shape: {shape}; dtype: {dtype_name}; batch {args.batch}, {args.new_tokens} new tokens "
          f"after {args.prompt_tokens}; {args.trials} trials", flush=True)
    print("| positions | eager tokens/s | compiled tokens/s | speedup | compile s | same greedy tokens |")
    print("|---|---|---|---|---|---|")
    results = []
    for positions in args.positions:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape, positions=positions)).to(device).eval()
        r = measure_decoding(model, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, trials=args.trials,
                             dtype=dtype, batch=args.batch)
        r.update(positions=positions, gpu=name)
        results.append(r)
        same = "yes" if r["same_tokens"] else f"from step {r['first_difference']}"
        print(f"| {positions} | {r['eager']['tokens_per_sec']:,.0f} ({r['eager']['spread'][0]:,.0f}-"
              f"{r['eager']['spread'][1]:,.0f}) | {r['compiled']['tokens_per_sec']:,.0f} "
              f"({r['compiled']['spread'][0]:,.0f}-{r['compiled']['spread'][1]:,.0f}) | {r['speedup']:.2f}x | "
              f"{r['compile_s']:.0f} | {same} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
