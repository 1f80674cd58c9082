"""GPT-2 124M (random weights: the same compute as the real ones) in minigpt against transformers' GPT2LMHeadModel.

    flock /tmp/minigpt-bench.lock python bench/bench_hf.py [--threads 2] [--trials 5] [--only generation ...]
    python bench/bench_hf.py --quick          # toy sizes, a few seconds: checks that every part runs

- generation: batch 1, 32-token prompt + 128 greedy tokens, KV cache, float32: ours, ours with int8 weights
  (`sample.py --quantize int8`), and GPT2LMHeadModel.generate; trials interleaved, medians. Decoding at batch 1
  reads every weight once per token, so the memory bandwidth (measured here by summing a 1 GiB tensor) bounds
  it: tokens/s <= bandwidth / bytes of weights; the table says how close each side runs to that bound.
- int8 cost: loss of a trained model on a text, float32 vs int8 (--loss-model: a minigpt checkpoint or a Hugging
  Face folder, default `out/` of `python train.py`; --loss-text: default a slice of the Python standard library).
- finetuning: one step = zero_grad + forward with loss + backward + AdamW step at batch 4 x 256 tokens, both
  models in the same loop; tokens/s, interleaved.
- peak memory: the same finetuning loop (3 steps) in a fresh process per side; peak resident set size.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.quantize import quantize_int8  # noqa: E402

SIZES = {  # GPT-2 124M, and a toy for --quick
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "quick": dict(vocab_size=2048, block_size=512, n_layer=2, n_head=4, n_embd=64),
}
PROMPT, NEW = 32, 128
FT_BATCH, FT_CONTEXT = 4, 256


def ours(size: dict) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**size, positions="learned", activation="gelu_tanh", bias=True, tie_weights=True))


def same_weights(hf_model, size: dict) -> GPT:
    """Ours with the weights of `hf_model`, through the importer that GPT.from_pretrained uses."""
    from minigpt.hf import to_minigpt_names

    model = ours(size)
    missing, unexpected = model.load_state_dict(
        to_minigpt_names(hf_model.state_dict(), "gpt2", model.config), strict=False)
    assert missing == ["head.weight"] and not unexpected  # the tied head is the embedding
    return model


def theirs(size: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=size["vocab_size"], n_positions=size["block_size"],
                                      n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"],
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0))


def interleaved(contenders: dict, trials: int) -> dict[str, float]:
    """Median seconds per call of each contender, trials interleaved (A, B, C, A, B, C, ...), after a warm-up."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(trials):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def read_bandwidth(threads: int) -> float:
    """Bytes per second the CPU reads from memory with `threads` threads: a sum over a 1 GiB float32 tensor."""
    big = torch.ones(1 << 28)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decoding step reads: every parameter once (a tied head reads the embedding matrix; the position
    table is read one row at a time and left out)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)


def bench_generation(size: dict, trials: int, threads: int) -> None:
    hf = theirs(size).eval()
    model = same_weights(hf, size).eval()
    int8 = quantize_int8(model)
    prompt = torch.randint(0, size["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def hf_generate() -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True,
                           pad_token_id=0)

    # same weights: the same greedy tokens, up to near-ties of random weights that float rounding may flip
    same = (model.generate(prompt, NEW, temperature=0) == hf_generate())[0, PROMPT:].float().mean().item()
    with torch.inference_mode():
        seconds = interleaved({
            "ours, KV cache": lambda: model.generate(prompt, NEW, temperature=0),
            "ours, int8 weights": lambda: int8.generate(prompt, NEW, temperature=0),
            "GPT2LMHeadModel.generate": hf_generate,
        }, trials)
    bandwidth = read_bandwidth(threads)
    fp32_bytes = weight_bytes(model)
    int8_bytes = fp32_bytes // 4  # the Linear weights; the embedding stays float32 but only its head copy is read
    print(f"\ngeneration, batch 1, {PROMPT}-token prompt + {NEW} greedy tokens, KV cache "
          f"(memory read bandwidth {bandwidth / 1e9:.1f} GB/s; float32 weights read per token "
          f"{fp32_bytes / 1e6:.0f} MB -> at most {bandwidth / fp32_bytes:.0f} tokens/s; greedy tokens equal to "
          f"generate's: {same:.0%})")
    reference = seconds["GPT2LMHeadModel.generate"]
    for who, s in seconds.items():
        limit = bandwidth / (int8_bytes if "int8" in who else fp32_bytes)
        print(f"  {who:26s} {NEW / s:8.1f} tokens/s   {reference / s:5.2f}x generate   "
              f"{NEW / s / limit:5.0%} of the bandwidth bound")


def bench_int8_loss(model_dir: str | None, text_file: str | None) -> None:
    from minigpt.evaluate import evaluate_loss

    folder = model_dir or "out"
    if not Path(folder).is_dir():
        print(f"\nint8 loss cost: no trained model at {folder} (run `python train.py` or pass --loss-model); skipped")
        return
    if (Path(folder) / "manifest.json").is_file():
        from minigpt.checkpoint import load_model

        model, tok, _ = load_model(folder)
    else:
        from minigpt.hf import load_pretrained, load_tokenizer

        model, tok = load_pretrained(folder), load_tokenizer(folder)
    if text_file:
        text = Path(text_file).read_text(encoding="utf-8")
    else:  # files the default run never trained on would be better; the stdlib slice is what is always here
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("[t-z]*.py")))
    ids = np.asarray(tok.encode_ordinary(text)[:200_000], dtype=np.int64)
    T = model.config.block_size
    fp32 = evaluate_loss(model, ids, T, 8, 16, byte_lengths=tok.token_byte_lengths())
    q8 = evaluate_loss(quantize_int8(model), ids, T, 8, 16, byte_lengths=tok.token_byte_lengths())
    print(f"\nint8 loss cost ({folder}, {q8['tokens']} tokens of {text_file or 'the stdlib [t-z]*.py'}): "
          f"float32 {fp32['loss']:.4f}, int8 {q8['loss']:.4f} nats/token "
          f"({q8['loss'] - fp32['loss']:+.4f}, {q8['loss'] / fp32['loss'] - 1:+.2%})")


def finetune_step(model, batch: int, context: int, vocab: int):
    x = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    is_ours = isinstance(model, GPT)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        # both read `context` tokens; GPT2LMHeadModel shifts its labels itself, ours takes the next tokens
        loss = model(x[:, :-1], x[:, 1:])[1] if is_ours else model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()

    return step


def bench_finetune(size: dict, trials: int) -> None:
    # context + 1 tokens: ours reads the first `context` as input and the last `context` as targets
    hf = theirs(size)
    contenders = {"ours": finetune_step(same_weights(hf, size), FT_BATCH, FT_CONTEXT + 1, size["vocab_size"]),
                  "GPT2LMHeadModel": finetune_step(hf, FT_BATCH, FT_CONTEXT + 1, size["vocab_size"])}
    seconds = interleaved(contenders, trials)
    print(f"\nfinetuning step, batch {FT_BATCH} x {FT_CONTEXT} tokens, AdamW (fused), float32")
    for who, s in seconds.items():
        print(f"  {who:18s} {s:7.2f} s/step {FT_BATCH * FT_CONTEXT / s:8.0f} tokens/s   "
              f"{seconds['GPT2LMHeadModel'] / s:5.2f}x GPT2LMHeadModel")


def bench_memory(quick: bool, threads: int) -> None:
    print(f"\npeak memory of a finetuning process (3 steps, batch {FT_BATCH} x {FT_CONTEXT}; fresh process each)")
    peaks = {}
    for who in ("ours", "GPT2LMHeadModel"):
        argv = [sys.executable, __file__, "--threads", str(threads), "--memory-child", who]
        argv += ["--quick"] if quick else []
        result = subprocess.run(argv, capture_output=True, text=True, check=True)
        peaks[who] = float(result.stdout.split()[-1])
    for who, peak in peaks.items():
        print(f"  {who:18s} {peak / 2**30:6.2f} GiB   {peak / peaks['GPT2LMHeadModel']:5.2f}x GPT2LMHeadModel")


def memory_child(who: str, size: dict) -> None:
    model = ours(size) if who == "ours" else theirs(size)
    step = finetune_step(model, FT_BATCH, FT_CONTEXT + 1, size["vocab_size"])
    for _ in range(3):
        step()
    print(peak_rss())


def peak_rss() -> int:
    """Peak resident bytes of this process. VmHWM, not ru_maxrss: the latter survives exec, so a child started
    by a big parent would report the parent's size."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every contender")
    parser.add_argument("--trials", type=int, default=None,
                        help="interleaved trials per measurement, median taken (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and 2 trials: check that everything runs")
    parser.add_argument("--only", action="append", choices=["generation", "int8-loss", "finetune", "memory"],
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--loss-model", help="for the int8 loss cost: a minigpt checkpoint or Hugging Face folder")
    parser.add_argument("--loss-text", help="for the int8 loss cost: a UTF-8 text file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    size = SIZES["quick" if args.quick else "gpt2"]
    if args.memory_child:
        return memory_child(args.memory_child, size)
    import transformers

    transformers.logging.set_verbosity_error()
    trials = args.trials or (2 if args.quick else 5)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads "
          f"({os.cpu_count()} CPUs visible), {trials} interleaved trials, medians; model "
          f"{'toy (--quick)' if args.quick else 'GPT-2 124M'}: {size}")
    parts = args.only or ["generation", "int8-loss", "finetune", "memory"]
    if "generation" in parts:
        bench_generation(size, trials, args.threads)
    if "int8-loss" in parts:
        bench_int8_loss(args.loss_model, args.loss_text)
    if "finetune" in parts:
        bench_finetune(size, trials)
    if "memory" in parts:
        bench_memory(args.quick, args.threads)


if __name__ == "__main__":
    main()
