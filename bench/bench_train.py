"""Training benchmarks: throughput against transformers' GPT-2, quality on the default corpus, length extrapolation.

Run under the shared lock so that benchmarks never overlap:

    flock /tmp/minigpt-bench.lock python bench/bench_train.py throughput
    flock /tmp/minigpt-bench.lock python bench/bench_train.py quality        # ~2 x 2000 iterations
    flock /tmp/minigpt-bench.lock python bench/bench_train.py extrapolation  # 3 x 2000 iterations

throughput: tokens/s of one training step (forward, backward, clip, AdamW) for our GPT and GPT2LMHeadModel, built
    with the same shape and trained by the same loop in the same process, in interleaved trials (so load from
    other processes hits both alike). Shapes: the CPU "baby" config (4 layers, 4 heads, 128 wide, context 64,
    batch 12) and 6 x 6 x 384 at context 256 (batch 12). Our model uses learned positions there, as GPT-2 does,
    plus a row with ALiBi (our default).
quality: the baby config trained with `minigpt.trainer.train` for 2000 iterations (lr 1e-3, warmup 100, cosine to
    1e-4, batch 12) on the offline default corpus, byte-level (256 byte tokens + end-of-text = 257) and with a
    4096-token BPE; final validation loss, bits per byte and wall time.
extrapolation: the same model and schedule with each kind of positions at block size 64 (BPE 4096), validation
    loss on the same first 64K validation tokens cut into windows of 64, 128, 256 and 512.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.config import TrainConfig  # noqa: E402
from minigpt.optim import clip_grad_norm, make_optimizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHAPES = {"baby 4x4x128 ctx64 b12": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
          "6x6x384 ctx256 b12": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=12)}


# ------------------------------------------------------------------------------------------- throughput
def _ours(shape: dict, vocab: int, positions: str) -> torch.nn.Module:
    cfg = GPTConfig(vocab_size=vocab, block_size=shape["block_size"], n_layer=shape["n_layer"],
                    n_head=shape["n_head"], n_embd=shape["n_embd"], positions=positions)
    model = GPT(cfg)
    return (lambda x: model(x)[0]), model


def _hf(shape: dict, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                     n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    return (lambda x: model(x).logits), model


def _step_time(forward, model, opt, shape, vocab, steps: int) -> float:
    """Seconds per training step, the same loop for both models: forward, loss, backward, clip, AdamW."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (shape["batch"], shape["block_size"] + 1), generator=g)
    start = time.perf_counter()
    for _ in range(steps):
        logits = forward(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def throughput(trials: int, vocab: int = 4096) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        steps = 10 if shape["n_embd"] <= 128 else 2
        makers = {"minigpt (learned)": lambda: _ours(shape, vocab, "learned"),
                  "minigpt (alibi)": lambda: _ours(shape, vocab, "alibi"),
                  "transformers GPT2LMHeadModel": lambda: _hf(shape, vocab)}
        runs = {}
        for label, make in makers.items():
            torch.manual_seed(0)
            forward, model = make()
            opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
            _step_time(forward, model, opt, shape, vocab, 2)  # warm-up
            runs[label] = (forward, model, opt, [])
        for _ in range(trials):  # interleaved: a burst of load elsewhere hits every model alike
            for label, (forward, model, opt, times) in runs.items():
                times.append(_step_time(forward, model, opt, shape, vocab, steps))
        tokens = shape["batch"] * shape["block_size"]
        hf = statistics.median(runs["transformers GPT2LMHeadModel"][3])
        for label, (_, model, _, times) in runs.items():
            t = statistics.median(times)
            rows.append({"shape": name, "model": label, "params_M": round(sum(p.numel() for p in model.parameters())
                                                                          / 1e6, 2),
                         "tokens_per_s": round(tokens / t), "ms_per_step": round(1000 * t, 1),
                         "speed_vs_hf": round(hf / t, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -------------------------------------------------------------------------------- quality, extrapolation
def _train(out: Path, cache: Path, vocab: int, positions: str, iters: int) -> tuple[dict, float]:
    from minigpt.trainer import train

    cfg = TrainConfig(vocab_size=vocab, data_dir=str(cache), out_dir=str(out), overwrite=True,
                      model=GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, positions=positions),
                      batch_size=12, max_iters=iters, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                      eval_interval=iters // 4, eval_iters=50, log_interval=50, device="cpu", progress=False)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return last, seconds


def quality(work: Path, iters: int) -> list[dict]:
    rows = []
    for vocab in (257, 4096):
        last, seconds = _train(work / f"q{vocab}", work / "cache", vocab, "alibi", iters)
        rows.append({"vocab": vocab, "iters": iters, "val_loss": round(last["val_loss"], 4),
                     "val_bits_per_byte": round(last["val_bits_per_byte"], 4),
                     "train_loss": round(last["train_loss"], 4), "wall_s_incl_data_prep": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def extrapolation(work: Path, iters: int, eval_tokens: int = 65536) -> list[dict]:
    from minigpt.checkpoint import load_model
    from minigpt.errors import MinigptError
    from minigpt.evaluate import evaluate_loss

    rows = []
    for positions in ("alibi", "sinusoidal", "learned", "rope"):
        out = work / f"x-{positions}"
        last, seconds = _train(out, work / "cache", 4096, positions, iters)
        model, tok, cfg = load_model(out)
        prepared_val = _val_tokens(work / "cache", tok.checksum)[: eval_tokens + 1]
        row = {"positions": positions, "train_block": 64, "train_s": round(seconds, 1)}
        for length in (64, 128, 256, 512):
            try:
                r = evaluate_loss(model, prepared_val, length, max(1, 4096 // length), None,
                                  tok.token_byte_lengths())
                row[f"val_loss@{length}"] = round(r["loss"], 4)
            except (MinigptError, RuntimeError, IndexError) as exc:
                row[f"val_loss@{length}"] = f"n/a ({str(exc)[:60]})"
        if isinstance(row.get("val_loss@256"), float):
            row["ratio_4x"] = round(row["val_loss@256"] / row["val_loss@64"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _val_tokens(cache: Path, checksum: str):
    from data.prepare import load_prepared

    for meta in sorted(cache.glob("*/meta.json")):
        if json.loads(meta.read_text()).get("tokenizer_checksum") == checksum:
            return load_prepared(meta.parent).val_tokens
    raise SystemExit(f"no prepared data with tokenizer {checksum} in {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["throughput", "quality", "extrapolation"])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--work", default=None, help="folder for runs and the token cache (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="minigpt-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, work folder {work}", flush=True)
    if args.what == "throughput":
        rows = throughput(args.trials)
    elif args.what == "quality":
        rows = quality(work, args.iters)
    else:
        rows = extrapolation(work, args.iters)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_{args.what}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
