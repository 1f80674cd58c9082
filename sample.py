"""Generate text from a checkpoint written by train.py, or measure a checkpoint's loss on a text file.

    python sample.py --prompt "def fibonacci(n):"         # streams a continuation
    echo "import os" | python sample.py --prompt -         # prompt from stdin
    python sample.py --eval some_file.py --block-size 512  # loss, perplexity, bits per byte

Only model.safetensors, config.json and tokenizer.json are read (no pickle). Generation stops at max-new-tokens,
at the end-of-text token, or at a --stop string (not printed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

from minigpt.config import TrainConfig
from minigpt.errors import ConfigError, MinigptError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see `python sample.py --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=TrainConfig().out_dir,
                   help="checkpoint folder written by train.py (its best/ subfolder holds the best-validation model)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue; '-' reads it from stdin (default: empty)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file ('-' for stdin)")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text such as <|endoftext|> in the prompt as the special token")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the nucleus of mass p, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=unescape,
                   help="stop at this text, not printed (may repeat; escapes such as \\n are understood)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (for comparison)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (on CUDA bfloat16, or float16 on GPUs without it; float32 elsewhere)|float32|"
                        "bfloat16|float16")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt, samples, counts, settings)")
    p.add_argument("--eval", metavar="FILE", help="instead of sampling: loss, perplexity and bits per byte on FILE")
    p.add_argument("--block-size", type=int, default=None, help="--eval window length (default: the training one)")
    p.add_argument("--batch-size", type=int, default=None, help="--eval windows per batch (default: the training one)")
    p.add_argument("--eval-batches", type=int, default=None, help="--eval at most this many batches (default: all)")
    return p


def unescape(text: str) -> str:
    """`--stop "\\n\\n"` means two newlines, as a shell cannot easily pass them; other characters pass unchanged."""
    with warnings.catch_warnings():  # an unknown escape such as \\d stays as it is, without a warning
        warnings.simplefilter("ignore", DeprecationWarning)
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file ('-' = stdin), or a one-line error saying what is wrong with it."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise MinigptError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MinigptError(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start}); "
                           f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def main() -> int:
    args = build_parser().parse_args()
    for name, low in (("max_new_tokens", 0), ("num_samples", 1), ("block_size", 1), ("batch_size", 1),
                      ("eval_batches", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")

    import torch  # after the arguments are known to be valid: a typo answers at once

    from minigpt.checkpoint import load_model
    from minigpt.device import autocast_dtype, resolve_device

    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(args.dtype, device)
    model, tokenizer, config = load_model(args.out_dir, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if args.eval:
        return evaluate_file(args, model, tokenizer, config, device, autocast)
    return generate(args, model, tokenizer, device, autocast)


def evaluate_file(args, model, tokenizer, config, device, autocast) -> int:
    import numpy as np

    from minigpt.evaluate import evaluate_loss

    text = read_text(args.eval, "evaluation file")
    ids = tokenizer.encode(text, allowed_special="all") if args.allow_special else tokenizer.encode_ordinary(text)
    block_size = args.block_size or config["model"]["block_size"]
    if config["model"]["positions"] == "learned" and block_size > config["model"]["block_size"]:
        raise ConfigError(f"--block-size {block_size} is longer than this learned-position model's "
                          f"{config['model']['block_size']} positions; use --block-size {config['model']['block_size']} "
                          f"or less (ALiBi and sinusoidal models take any length)")
    batch_size = args.batch_size or config.get("train", {}).get("batch_size", 8)
    with autocast:
        result = evaluate_loss(model, np.asarray(ids, dtype=np.int64), block_size, batch_size, args.eval_batches,
                               byte_lengths=tokenizer.token_byte_lengths(), device=device)
    result.update(file=args.eval, block_size=block_size, batch_size=batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.eval}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
              f"bits per byte {result['bits_per_byte']:.4f} ({result['tokens']} tokens scored, "
              f"block size {block_size})")
    return 0


def generate(args, model, tokenizer, device, autocast) -> int:
    import torch

    from minigpt.textstream import SampleStream

    prompt = read_text(args.prompt_file, "prompt file") if args.prompt_file else (
        read_text("-", "prompt from") if args.prompt == "-" else args.prompt)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # the shell handed over bytes that are not UTF-8 (Python keeps them as surrogates)
        raise MinigptError(f"the prompt is not valid UTF-8 text (bad byte at character {exc.start}); pass UTF-8, "
                           f"or use --prompt-file") from None
    ids = tokenizer.encode(prompt, allowed_special="all") if args.allow_special else tokenizer.encode_ordinary(prompt)
    if not ids:  # nothing to condition on: start as a new document does
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    samples = []
    for n in range(args.num_samples):
        stream = SampleStream(model, tokenizer, idx, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, generator=generator,
                              stop=args.stop)
        if not args.json:
            print(f"--- sample {n + 1} ---\n" if args.num_samples > 1 else "", prompt, sep="", end="", flush=True)
        start = time.perf_counter()
        with autocast:
            for piece in stream:
                if not args.json:
                    print(piece, end="", flush=True)
        seconds = time.perf_counter() - start
        samples.append({"text": stream.text, "tokens": stream.tokens, "finish_reason": stream.finish_reason,
                        "seconds": round(seconds, 4)})
        if not args.json:
            print()
            print(f"[{stream.tokens} tokens in {seconds:.2f}s, {stream.tokens / max(seconds, 1e-9):.1f} tokens/s]",
                  file=sys.stderr)
    if args.json:
        settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")}
        print(json.dumps({"prompt": prompt, "prompt_tokens": len(ids), "samples": samples, "settings": settings,
                          "out_dir": args.out_dir}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
