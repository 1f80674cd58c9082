"""Generate text from a checkpoint written by train.py, or measure a checkpoint's loss on a text file.

    python sample.py --init-from gpt2 --prompt "Hello"   # a pretrained GPT-2-family model (folder or hub name)

    python sample.py --prompt "def fibonacci(n):"         # streams a continuation
    echo "import os" | python sample.py --prompt -         # prompt from stdin
    python sample.py --eval some_file.py --block-size 512  # loss, perplexity, bits per byte
    python sample.py --init-from gpt2 --eval-choices hellaswag_val.jsonl   # multiple choice: acc, acc_norm

Only model.safetensors, config.json and tokenizer.json are read (no pickle). Generation stops at max-new-tokens,
at the end-of-text token, or at a --stop string (not printed).
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import sys
import time
import warnings
from pathlib import Path

from minigpt.config import (ATTENTION_CHOICES, DEVICES, DTYPES, ERROR_MODES, OPEN_CHOICES, PROMPT_CONTEXTS, TrainConfig,
                            expand_path)
from minigpt.errors import ConfigError, MinigptError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see `python sample.py --help`)")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--out-dir", default=None, type=expand_path, help="checkpoint folder written by train.py; its "
                        f"best/ subfolder holds the best-validation model (default: {TrainConfig().out_dir})")
    source.add_argument("--init-from", metavar="FOLDER|NAME", default=None, type=expand_path,
                        help="a pretrained GPT-2-family model instead: a Hugging Face folder or hub name (gpt2, ...)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue; '-' reads it from stdin (default: empty)")
    prompt.add_argument("--prompt-file", metavar="FILE", type=expand_path,
                        help="read the prompt from a UTF-8 file ('-' for stdin)")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text such as <|endoftext|> in the prompt as the special token")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the nucleus of mass p, in (0, 1] (default: 1, all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for reproducible samples (default: a random one, which --json records)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to generate from the prompt")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=unescape,
                   help="stop at this text, not printed (may repeat; escapes such as \\n are understood)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (for comparison)")
    p.add_argument("--compile", action="store_true",
                   help="decode with CUDA graphs: the decoding step compiled once (torch.compile), several times "
                        "faster at batch 1 on a GPU; the first sample waits for the compilation. The step has fixed "
                        "shapes (every row, finished or not, over the KV cache's whole capacity), which a CPU, with "
                        "no CUDA graphs to gain, computes in full")
    p.add_argument("--device", default="auto",
                   help=f"one of {', '.join(DEVICES)}, or {OPEN_CHOICES['device']}; auto: cuda, else mps, else cpu")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel: sdpa (torch's scaled_dot_product_attention) or flex (FlexAttention; "
                        "compiled on CUDA, unfused and slow elsewhere); auto is flex for ALiBi on CUDA, else sdpa")
    p.add_argument("--dtype", default="auto",
                   help=f"one of {', '.join(DTYPES)}; auto is bfloat16 on CUDA (float16 on GPUs without bfloat16), "
                        "float32 elsewhere")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU inference with int8 Linear weights (faster decoding, slightly higher loss)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt, samples, counts, settings)")
    p.add_argument("--eval", metavar="PATH", type=expand_path,
                   help="instead of sampling: loss, perplexity and bits per byte on PATH (a text file, folder, glob, "
                   ".jsonl or .parquet, read as train.py --data reads it)")
    p.add_argument("--block-size", type=int, default=None, help="--eval window length (default: the training one)")
    p.add_argument("--batch-size", type=int, default=None, help="--eval windows per batch (default: the training one)")
    p.add_argument("--eval-batches", type=int, default=None, help="--eval at most this many batches (default: all)")
    p.add_argument("--text-field", default=None, help="--eval: the field holding the text in .jsonl/.parquet rows "
                   "(default: the training run's)")
    p.add_argument("--errors", default=None, choices=ERROR_MODES,
                   help="--eval: what to do with invalid UTF-8 in files (default: the training run's)")
    p.add_argument("--eval-choices", metavar="FILE.jsonl", type=expand_path,
                   help="instead of sampling: multiple-choice accuracy (acc, acc_norm) on FILE, one item a line: "
                   "HellaSwag's ctx/endings/label or context/choices/label; --batch-size choices a batch")
    p.add_argument("--limit", type=int, default=None, help="--eval-choices: the first N items only (default: all)")
    return p


# What each use of sample.py reads (the rest: --out-dir/--init-from, --device, --dtype, --attention, --quantize,
# --json, read by all). A flag given to a use that does not read it is refused, never silently dropped.
USES = {
    "sampling": ("prompt", "prompt_file", "allow_special", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                 "num_samples", "stop", "no_cache", "compile"),
    "--eval": ("eval", "allow_special", "block_size", "batch_size", "eval_batches", "text_field", "errors"),
    "--eval-choices": ("eval_choices", "batch_size", "limit"),
}


def check_flags_apply(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A one-line error for flags given (different from their defaults) that this use of sample.py would ignore."""
    use = "--eval" if args.eval else "--eval-choices" if args.eval_choices else "sampling"
    unread = [name for name in dict.fromkeys(n for names in USES.values() for n in names)
              if name not in USES[use] and getattr(args, name) != parser.get_default(name)]
    if unread:
        flags = " ".join("--" + name.replace("_", "-") for name in unread)
        raise ConfigError(f"{flags} {'does' if len(unread) == 1 else 'do'} nothing for {use}"
                          f"{' (without --eval or --eval-choices)' if use == 'sampling' else ''}; leave "
                          f"{'it' if len(unread) == 1 else 'them'} out")


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
    parser = build_parser()
    args = parser.parse_args()
    for name, low in (("max_new_tokens", 0), ("num_samples", 1), ("block_size", 1), ("batch_size", 1),
                      ("eval_batches", 1), ("limit", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if "" in args.stop:
        raise ConfigError('--stop "" would stop before the first token; give the text to stop at, or no --stop')
    if args.seed is not None and not -2 ** 63 <= args.seed < 2 ** 64:
        raise ConfigError(f"--seed must be in [-2**63, 2**64 - 1] (torch's seeds), got {args.seed}")
    if args.eval and args.eval_choices:
        raise ConfigError("give --eval or --eval-choices, not both")
    if args.compile and args.no_cache:
        raise ConfigError("--compile compiles the step that decodes from the KV cache; leave out --no-cache or "
                          "--compile")
    if args.compile and (args.eval or args.eval_choices):
        raise ConfigError(f"--compile is for sampling (it compiles the decoding step); leave it out with "
                          f"{'--eval' if args.eval else '--eval-choices'}")
    check_flags_apply(parser, args)
    if args.seed is None:  # drawn here, so that --json can record it and any sample can be made again
        args.seed = random.SystemRandom().randrange(2 ** 31)
    if args.eval_choices:
        from minigpt.choices import read_items

        items = read_items(args.eval_choices, args.limit)  # a bad line stops here, before a model is loaded

    from minigpt.inference import load_for_inference  # imports torch: after the arguments are known to be valid

    loaded = load_for_inference(args.out_dir or TrainConfig().out_dir, args.init_from, args.device, args.dtype,
                                args.quantize, args.attention, args.compile)
    model, tokenizer, config, device = loaded.model, loaded.tokenizer, loaded.config, loaded.device
    autocast = loaded.autocast()
    if args.eval:
        return evaluate_file(args, model, tokenizer, config, device, autocast)
    if args.eval_choices:
        return evaluate_choices(args, items, model, tokenizer, config, device, autocast)
    return generate(args, model, tokenizer, device, autocast)


def evaluate_file(args, model, tokenizer, config, device, autocast) -> int:
    import numpy as np

    from minigpt.evaluate import evaluate_loss

    ids = eval_tokens(args, tokenizer, config.get("train", {}))
    block_size = args.block_size or config["model"]["block_size"]
    limit = model.config.context_limit
    if limit is not None and block_size > limit:
        raise ConfigError(f"--block-size {block_size} is longer than this learned-position model's {limit} positions; "
                          f"use --block-size {limit} or less (ALiBi, RoPE and sinusoidal models take any length)")
    if len(ids) < 2:
        raise MinigptError(f"{args.eval} holds {len(ids)} token{'s' * (len(ids) != 1)}: too little to score (a "
                           f"prediction needs 2); give more text")
    if len(ids) - 1 < block_size:  # shorter than one window: score it whole, on a shorter one
        print(f"note: {args.eval} holds {len(ids)} tokens, less than one block of {block_size} + 1: scoring it on one "
              f"window of {len(ids) - 1}", file=sys.stderr)
        block_size = len(ids) - 1
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


def evaluate_choices(args, items, model, tokenizer, config, device, autocast) -> int:
    from minigpt.choices import ChoiceSet

    choices = ChoiceSet(items, tokenizer, model.config.block_size)
    batch_size = args.batch_size or config.get("train", {}).get("batch_size", 16)
    with autocast:
        result = choices.score(model, batch_size, device, progress=True)
    if result["cut"]:
        whole = (f"; in {choices.choices_cut} a choice alone was that long, and only its last tokens were scored"
                 if choices.choices_cut else "")
        print(f"note: {result['cut']} of {result['n']} items were longer than the model's context of "
              f"{model.config.block_size} tokens; their contexts were cut from the left{whole}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result, "file": args.eval_choices}))
    else:
        print(f"{args.eval_choices}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} ({result['n']} "
              f"items)")
    return 0


def eval_tokens(args, tokenizer, train_config: dict) -> list[int]:
    """The ids of --eval's documents, read by data/sources.py as --data is (folders, .jsonl fields, ...), and
    joined with the end-of-text token between them, as in the prepared data."""
    from data.sources import iter_documents

    if args.eval == "-":
        docs = [read_text("-", "evaluation text from")]
    elif not glob.has_magic(args.eval) and not Path(args.eval).expanduser().exists():
        raise MinigptError(f"no evaluation file or folder {args.eval}; check the path")
    else:
        docs = iter_documents(args.eval, text_field=args.text_field or train_config.get("text_field", "text"),
                              errors=args.errors or train_config.get("errors", "strict"))
    ids: list[int] = []
    for k, doc in enumerate(docs):
        if k and tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        ids += tokenizer.encode(doc, allowed_special="all") if args.allow_special else tokenizer.encode_ordinary(doc)
    return ids


def cap_prompt(ids: list[int], config) -> list[int]:
    """The last PROMPT_CONTEXTS training contexts of a prompt that is longer, saying so (see PROMPT_CONTEXTS);
    learned-position models need no cap: generation slides their window over the prompt."""
    limit = PROMPT_CONTEXTS * config.block_size
    if config.context_limit is not None or len(ids) <= limit:
        return ids
    print(f"note: the prompt has {len(ids):,} tokens, more than {PROMPT_CONTEXTS} times this model's training "
          f"context of {config.block_size}; the model reads only its last {limit:,} tokens (memory grows with the "
          f"square of the length read)", file=sys.stderr)
    return ids[-limit:]


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
    ids = cap_prompt(ids, model.config)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    samples = []
    if args.compile:
        print("note: --compile: the first tokens wait for the decoding step to compile", file=sys.stderr)
    for n in range(args.num_samples):
        # Sample n draws from seed + n, as choice n of the server's `n` does: each can be made again on its own.
        generator = torch.Generator(device=device).manual_seed((args.seed + n) % 2 ** 64)
        stream = SampleStream(model, tokenizer, idx, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, generator=generator,
                              stop=args.stop, compile=args.compile)
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
                          "out_dir": args.out_dir, "init_from": args.init_from}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
