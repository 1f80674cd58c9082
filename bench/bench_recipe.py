"""Quality per minute: the GPT-2-style baseline against each modern switch alone and a combination, at equal
wall-clock time (or an equal step count), a few seeds each, scored by validation bits per byte.

Run under the shared lock so that benchmarks never overlap (2 minutes x 9 configurations x 2 seeds ≈ 40 minutes):

    flock /tmp/minigpt-bench.lock python bench/bench_recipe.py --time 2m --work DIR
    python bench/bench_recipe.py --max-iters 5 --max-bytes 300000      # a quick check that everything runs

Searching settings (the default run's retune) with `--tuning-split`: every 20th training document is held out as
a tuning split, the runs train on the rest and are scored on it, so a choice never looks at the validation split.
`--candidate NAME=FLAGS` adds configurations to compare, e.g.

    python bench/bench_recipe.py --time 2m --tuning-split --seeds 1337 --configs baseline,lr3 \
        --candidate "lr3=--lr 3e-3"

Every run is `python train.py` with the default settings (default corpus, default model and schedule) plus its
configuration's flags, its seed, and either `--max-time TIME` (train.py stops when the time is up) or
`--max-iters N`. The token cache is prepared once, before any timed run, and shared. Runs go seed by seed, all
configurations within a seed, so that load from other processes drifts over all of them alike.

Score: the final checkpoint (not best/) on the whole validation split, every window of block_size tokens once,
in bits per byte (tokenizer-independent). Reported per configuration: the median over seeds, the spread
(max - min), each seed's value, the steps reached, the seconds of the run (from train.py's metrics: data
loading, the step-0 evaluation and the final save included), and the change of the median against the baseline's.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
# name -> train.py flags; "baseline" is today's defaults (GPT-2 style: LayerNorm, GELU, tied head, AdamW).
SWITCHES = {
    "baseline": "",
    "rope": "--positions rope",
    "rmsnorm": "--norm rmsnorm",
    "swiglu": "--mlp swiglu",
    "relu2": "--mlp relu2",
    "qk-norm": "--qk-norm",
    "untied-head": "--no-tie-weights",
    "muon": "--optimizer muon",
}
COMBINATION = "--positions rope --norm rmsnorm --mlp swiglu --qk-norm --optimizer muon"
DATA_FLAGS = ("--vocab-size", "--pattern")  # flags that change the prepared tokens
TUNING_EVERY = 20  # --tuning-split holds out every 20th training document (5 %)


def train_run(out: Path, flags: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out-dir", str(out), *flags],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed for {out.name} (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result


def data_flags(flags: list[str]) -> list[str]:
    """The part of a configuration's flags that changes the prepared tokens (each such set is prepared once)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in DATA_FLAGS:
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(flags)
    return [part for flag in DATA_FLAGS if (value := getattr(known, flag[2:].replace("-", "_"))) is not None
            for part in (flag, value)]


def carve_tuning_split(prepared: Path, out: Path) -> None:
    """Copy a prepared-data folder to `out` with every TUNING_EVERY-th training document as its val.bin and the
    other training documents as its train.bin. The original validation split is not copied at all."""
    from data.prepare import load_prepared

    if (out / "meta.json").is_file():
        return
    data = load_prepared(prepared)
    train, eot = np.asarray(data.train_tokens), data.meta["eot_id"]
    starts = np.flatnonzero(train == eot)  # every document begins with EOT
    if len(starts) < TUNING_EVERY:
        raise SystemExit(f"{prepared} has {len(starts)} training documents, too few for a tuning split")
    documents = np.split(train, starts[1:])
    held = [d for i, d in enumerate(documents) if i % TUNING_EVERY == TUNING_EVERY - 1]
    kept = [d for i, d in enumerate(documents) if i % TUNING_EVERY != TUNING_EVERY - 1]
    byte_lengths = np.array(data.tokenizer.token_byte_lengths())
    splits = {"train": np.concatenate(kept), "val": np.concatenate(held)}
    meta = {**data.meta, "tokens": {k: len(v) for k, v in splits.items()},
            "bytes": {k: int(byte_lengths[v].sum()) for k, v in splits.items()},
            "documents": {"train": len(kept), "val": len(held)}, "tuning_split": f"every {TUNING_EVERY}th document"}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(prepared / data.meta["tokenizer_file"], tmp / data.meta["tokenizer_file"])
    for name, tokens in splits.items():
        tokens.tofile(tmp / f"{name}.bin")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(out)


def score(out: Path, data_dir: Path, eval_batches: int | None) -> dict:
    """Validation loss and bits per byte of the checkpoint in `out` over the whole validation split."""
    from data.prepare import load_prepared
    from minigpt.checkpoint import load_model
    from minigpt.evaluate import evaluate_loss

    model, tok, config = load_model(out)
    for meta in sorted(data_dir.glob("*/meta.json")):
        if json.loads(meta.read_text()).get("tokenizer_checksum") == tok.checksum:
            val = load_prepared(meta.parent).val_tokens
            break
    else:
        raise SystemExit(f"no prepared data of the tokenizer of {out} in {data_dir}")
    result = evaluate_loss(model, val, model.config.block_size, 16, eval_batches, tok.token_byte_lengths())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"val_loss": result["loss"], "val_bits_per_byte": result["bits_per_byte"], "steps": config["step"],
            "train_s": last["elapsed_s"]}


def table(rows: list[dict], names: list[str]) -> str:
    """Markdown: median, spread and values of val bits per byte per configuration, and the change vs baseline."""
    by_name = {name: [r for r in rows if r["config"] == name] for name in names}
    medians = {name: statistics.median(r["val_bits_per_byte"] for r in rs) for name, rs in by_name.items()}
    base = medians.get("baseline")
    lines = ["| configuration | val bits/byte (median) | spread (max - min) | per seed | vs baseline | steps | "
             "train s |", "|---|---|---|---|---|---|---|"]
    for name, rs in by_name.items():
        values = [r["val_bits_per_byte"] for r in rs]
        change = f"{100 * (medians[name] / base - 1):+.1f} %" if base else "-"
        lines.append(f"| {name} | {medians[name]:.4f} | {max(values) - min(values):.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in values)} | {change} | "
                     f"{statistics.median(r['steps'] for r in rs):.0f} | "
                     f"{statistics.median(r['train_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--time", help="wall-clock budget per run, passed to train.py --max-time (e.g. 2m)")
    budget.add_argument("--max-iters", type=int, help="equal step count per run instead (times are reported)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--configs", default=",".join([*SWITCHES, "combination"]),
                        help=f"comma-separated subset of {', '.join(SWITCHES)}, combination")
    parser.add_argument("--combination", default=COMBINATION, help="train.py flags of the 'combination' run")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=FLAGS",
                        help="another configuration: a name and its train.py flags (repeatable)")
    parser.add_argument("--keep-evals", action="store_true",
                        help="keep train.py's evaluations during the runs (a default run as a user sees it, their "
                             "time included) instead of switching them off")
    parser.add_argument("--tuning-split", action="store_true",
                        help=f"train without every {TUNING_EVERY}th training document and score on those (for "
                             f"choosing settings), instead of the validation split")
    parser.add_argument("--max-bytes", type=int, help="read at most this many bytes of the corpus (quick checks)")
    parser.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--lr 2e-3'")
    parser.add_argument("--eval-batches", type=int, help="score on this many batches of 16 windows (default all)")
    parser.add_argument("--work", help="folder for runs and the token cache (default: a temp dir)")
    args = parser.parse_args()

    configs = {**SWITCHES, "combination": args.combination}
    for candidate in args.candidate:
        name, sep, flags = candidate.partition("=")
        if not sep or not name:
            raise SystemExit(f"--candidate takes NAME=FLAGS, got {candidate!r}")
        configs[name] = flags
    names = args.configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(configs)}")
    if args.time and "--max-time" not in subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"],
                                                        capture_output=True, text=True, cwd=ROOT).stdout:
        raise SystemExit("this train.py has no --max-time; compare at an equal step count with --max-iters N")
    work = Path(args.work or tempfile.mkdtemp(prefix="minigpt-recipe-"))
    data_dir = work / "data"
    common = ["--data-dir", str(data_dir), "--overwrite", "--no-progress",
              *(["--max-bytes", str(args.max_bytes)] if args.max_bytes else [])]
    budget_flags = ["--max-time", args.time] if args.time else ["--max-iters", str(args.max_iters)]
    if not args.keep_evals:
        # Evaluations during the run would eat into its time: one at step 0 (the trainer's), and the scoring after.
        common += ["--eval-iters", "1", "--eval-interval", "1000000000"]
    common += shlex.split(args.train_flags)

    print(f"work folder {work}; preparing the token cache once per vocabulary", flush=True)
    for prepare in sorted({tuple(data_flags(shlex.split(configs[name]))) for name in names}):
        seconds, _ = train_run(work / "prepare", [*common, "--max-iters", "1", *prepare])
        print(f"  {' '.join(prepare) or 'default'} ({seconds:.0f} s)", flush=True)
    if args.tuning_split:
        tuning_dir = work / "tuning-data"
        for meta in sorted(data_dir.glob("*/meta.json")):
            carve_tuning_split(meta.parent, tuning_dir / meta.parent.name)
        common[common.index("--data-dir") + 1] = str(tuning_dir)
        data_dir = tuning_dir

    rows = []
    for seed in args.seeds:
        for name in names:
            out = work / "runs" / f"{name}-seed{seed}"
            flags = [*common, *budget_flags, "--seed", str(seed), *shlex.split(configs[name])]
            seconds, _ = train_run(out, flags)
            row = {"config": name, "seed": seed, "flags": configs[name], "wall_s": round(seconds, 1),
                   **score(out, data_dir, args.eval_batches)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    budget_text = f"--max-time {args.time}" if args.time else f"--max-iters {args.max_iters}"
    split = f"tuning split (every {TUNING_EVERY}th training document)" if args.tuning_split else "validation split"
    print(f"\n{budget_text}, seeds {args.seeds}, scored on the {split}\n\n{table(rows, names)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("tuning.json" if args.tuning_split else "recipe.json")).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
