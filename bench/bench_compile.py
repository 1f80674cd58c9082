"""--compile against eager through the real training loop, evaluations included, and what torch.compile made of it.

    flock /tmp/minigpt-bench.lock python bench/bench_compile.py                       # CPU sanity check
    python bench/bench_compile.py --device cuda --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 \\
        --batch-size 64 --max-iters 300 --positions learned alibi --attention sdpa flex   # on a GPU

Each run is `minigpt.trainer.train` on the offline default corpus (prepared once into a shared cache), with an
evaluation every --eval-interval steps, so that training and evaluation alternate as in a real run. Runs are
interleaved (trial by trial, every configuration once per trial) so that load from other processes hits all
alike. Per configuration: the median of the logged tokens/s over the second half of each run's steps (steady
state, compilation excluded) and its spread over trials, the wall time of the whole run (compilation included),
and for compiled runs the number of graphs torch._dynamo compiled and of graph breaks (both counted per run).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from minigpt.config import GPTConfig, TrainConfig  # noqa: E402
from minigpt.trainer import train  # noqa: E402


def one_run(args, work: Path, positions: str, attention: str, compiled: bool) -> dict:
    torch._dynamo.reset()
    counters.clear()
    cfg = TrainConfig(out_dir=str(work / "out"), data_dir=str(work / "data"), overwrite=True, progress=False,
                      max_bytes=args.max_bytes, device=args.device, attention=attention, compile=compiled,
                      batch_size=args.batch_size, max_iters=args.max_iters, warmup_iters=10,
                      eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=1,
                      model=GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                      block_size=args.block_size, positions=positions))
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = train(cfg)
    wall = time.perf_counter() - started
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in steps if r["kind"] == "train"]
    return {"tokens_per_sec": statistics.median(speeds[len(speeds) // 2:]), "wall_s": wall,
            "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--positions", nargs="+", default=["learned", "alibi"])
    p.add_argument("--attention", nargs="+", default=["auto"], help="kernels to compare (auto|sdpa|flex)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-iters", type=int, default=120)
    p.add_argument("--eval-interval", type=int, default=40)
    p.add_argument("--eval-iters", type=int, default=5)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (a shared CPU: 1 avoids oversubscription)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = list(itertools.product(args.positions, args.attention, (False, True)))
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            for config in configs:
                results[config].append(one_run(args, Path(tmp), *config))
                r = results[config][-1]
                print(f"trial {trial + 1}: {config[0]}, {config[1]}, {'compiled' if config[2] else 'eager'}: "
                      f"{r['tokens_per_sec']:,.0f} tokens/s, {r['wall_s']:.1f} s", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{device}, torch {torch.__version__}, {args.n_layer}x{args.n_head}x{args.n_embd} context "
          f"{args.block_size} batch {args.batch_size}, {args.max_iters} steps, evaluation every "
          f"{args.eval_interval}; {args.trials} interleaved trials\n")
    print("| positions | attention | mode | tokens/s (median, min-max) | vs eager | run wall s (first, later) "
          "| graphs | graph breaks |")
    print("|---|---|---|---|---|---|---|---|")
    for positions, attention, compiled in configs:
        runs = results[(positions, attention, compiled)]
        speeds = [r["tokens_per_sec"] for r in runs]
        eager = statistics.median(r["tokens_per_sec"] for r in results[(positions, attention, False)])
        walls = [r["wall_s"] for r in runs]
        print(f"| {positions} | {attention} | {'compiled' if compiled else 'eager'} | "
              f"{statistics.median(speeds):,.0f} ({min(speeds):,.0f}-{max(speeds):,.0f}) | "
              f"{statistics.median(speeds) / eager:.2f}x | {walls[0]:.1f}, {statistics.median(walls[1:] or walls):.1f} | "
              f"{runs[-1]['graphs'] if compiled else '-'} | {runs[-1]['breaks'] if compiled else '-'} |")


if __name__ == "__main__":
    main()
