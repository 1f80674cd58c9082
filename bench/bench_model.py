"""Speed of minigpt's GPT against transformers' GPT2LMHeadModel (SDPA attention) on the same shapes.

    flock /tmp/minigpt-bench.lock python bench/bench_model.py [--threads 2] [--trials 7] [--only small]

Training: one step = zero_grad + forward with loss + backward + AdamW step, for both models with the same sizes,
the same tied embeddings, no dropout, biases everywhere, and the same optimizer (torch AdamW, fused). Both use
learned positions (GPT-2's); the default ALiBi model is timed too. Trials are interleaved in one process so that
a busy machine slows both sides alike; each side's figure is the median over trials.

Generation: greedy, 256 new tokens from a 16-token prompt at batch 1, small size, context 512 (so that
GPT-2's learned positions cover the whole text): ours with and without the KV cache, and
GPT2LMHeadModel.generate with its cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt import GPT, GPTConfig

VOCAB = 4096  # the project's default tokenizer size
SIZES = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
    "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8),
}
GEN_PROMPT, GEN_NEW, GEN_CONTEXT = 16, 256, 512


def ours(size: dict, positions: str = "learned", block_size: int | None = None) -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=block_size or size["block_size"], n_layer=size["n_layer"],
                    n_head=size["n_head"], n_embd=size["n_embd"], dropout=0.0, positions=positions, bias=True,
                    tie_weights=True)
    return GPT(cfg)


def theirs(size: dict, block_size: int | None = None) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=block_size or size["block_size"], n_layer=size["n_layer"],
                     n_head=size["n_head"], n_embd=size["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=True, attn_implementation="sdpa",
                     bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def train_step_fn(model, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    is_ours = isinstance(model, GPT)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        # GPT2LMHeadModel shifts labels itself; ours takes next-token targets directly.
        loss = model(x, y)[1] if is_ours else model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()

    return step


def interleaved(contenders: dict, trials: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each contender, trials interleaved (A, B, C, A, B, C, ...)."""
    for fn in contenders.values():  # warm-up: allocator, kernels, lazy init
        fn()
        fn()
    times = {name: [] for name in contenders}
    for _ in range(trials):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_training(name: str, size: dict, trials: int) -> None:
    torch.manual_seed(0)
    B, T = size["batch"], size["block_size"]
    x = torch.randint(0, VOCAB, (B, T))
    y = torch.randint(0, VOCAB, (B, T))
    contenders = {
        "ours (learned)": train_step_fn(ours(size), x, y),
        "ours (alibi)": train_step_fn(ours(size, "alibi"), x, y),
        "GPT2LMHeadModel": train_step_fn(theirs(size), x, y),
    }
    repeats = 5 if name == "small" else 1
    seconds = interleaved(contenders, trials, repeats)
    ref = seconds["GPT2LMHeadModel"]
    print(f"\ntraining step, {name}: {size['n_layer']} layers, {size['n_head']} heads, {size['n_embd']} wide, "
          f"context {T}, batch {B}, vocab {VOCAB}")
    for who, s in seconds.items():
        print(f"  {who:18s} {s * 1e3:8.1f} ms/step {B * T / s:9.0f} tokens/s   {ref / s:5.2f}x GPT2LMHeadModel")


def bench_generation(trials: int) -> None:
    size = SIZES["small"]
    torch.manual_seed(0)
    prompt = torch.randint(0, VOCAB, (1, GEN_PROMPT))
    model = ours(size, block_size=GEN_CONTEXT).eval()
    alibi = ours(size, "alibi").eval()  # context 64: generates far past it, the cache keeps growing
    hf = theirs(size, block_size=GEN_CONTEXT).eval()

    def hf_generate() -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False, use_cache=True,
                           pad_token_id=0)

    contenders = {
        "ours, KV cache": lambda: model.generate(prompt, GEN_NEW, temperature=0, use_cache=True),
        "ours, no cache": lambda: model.generate(prompt, GEN_NEW, temperature=0, use_cache=False),
        "ours alibi ctx 64, cache": lambda: alibi.generate(prompt, GEN_NEW, temperature=0, use_cache=True),
        "GPT2LMHeadModel.generate": hf_generate,
    }
    assert hf_generate().shape[1] == GEN_PROMPT + GEN_NEW
    seconds = interleaved(contenders, trials, repeats=1)
    print(f"\ngeneration, small size (context {GEN_CONTEXT}), batch 1, greedy, {GEN_PROMPT}-token prompt + "
          f"{GEN_NEW} new tokens")
    cached = seconds["ours, KV cache"]
    for who, s in seconds.items():
        print(f"  {who:26s} {s * 1e3:8.1f} ms {GEN_NEW / s:8.0f} tokens/s   ours-with-cache is {s / cached:5.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every contender")
    parser.add_argument("--trials", type=int, default=7, help="interleaved trials per measurement (median taken)")
    parser.add_argument("--only", choices=["small", "large", "generation"], action="append",
                        help="run only these parts (repeatable); default: all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads "
          f"({os.cpu_count()} CPUs visible), {args.trials} interleaved trials, medians")
    parts = args.only or ["small", "large", "generation"]
    for name in ("small", "large"):
        if name in parts:
            bench_training(name, SIZES[name], args.trials)
    if "generation" in parts:
        bench_generation(args.trials)


if __name__ == "__main__":
    main()
