#!/usr/bin/env bash
# What the GPT-2 124M reproduction costs on this GPU (README, "GPT-2 124M on GPUs"), offline: the preset's shape,
# batch and 524,288 tokens a step, trained through train.py for a few steps, eager and compiled; prints the median
# tokens/s and MFU of the steps after the first 5, and the hours 10B tokens would take on 1 and 8 such GPUs.
# Offline because GPU machines often are: the data is the stdlib corpus (the loader draws random windows, so its
# size does not matter), the tokenizer cl100k_base's first 50,256 ranks + <|endoftext|> (50,257 ids: GPT-2's
# embedding and head size, hence its FLOPs). Usage: bash bench/gpt2_124m_speed.sh [work folder] [train.py flags]
# (about 3 minutes on one H100; add e.g. --batch-size 16 if 32 does not fit).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/minigpt-gpt2-speed}
shift || true
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - "$WORK/tok.json" <<'EOF'
import sys
from pathlib import Path
import tiktoken_ext
from tokenizer import GPT4_PATTERN, Tokenizer
from tokenizer.formats import read_tiktoken
cl100k = read_tiktoken(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken")
ranks = {token: rank for token, rank in cl100k.items() if rank < 50256}  # merge order: any prefix is a BPE
Tokenizer(ranks, GPT4_PATTERN, {"<|endoftext|>": 50256}).save(sys.argv[1])
EOF
for mode in eager compile; do
    flag=$([ $mode = compile ] && echo --compile || true)
    python3 train.py --config configs/gpt2-124m.toml --dataset "" --dataset-config "" --tokenizer "$WORK/tok.json" \
        --data-dir "$WORK/data" --out-dir "$WORK/$mode" --overwrite --max-iters 25 --warmup-iters 5 --eval-iters 1 \
        --device cuda --no-progress $flag "$@" >"$WORK/$mode.log" 2>&1 \
        || { echo "$mode FAILED"; tail -5 "$WORK/$mode.log"; }
done
python3 - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
for mode in ("eager", "compile"):
    path = work / mode / "metrics.jsonl"
    if not path.is_file():
        continue
    steps = [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train" and r["step"] > 5]
    rate = statistics.median(r["tokens_per_sec"] for r in steps)
    mfu = statistics.median(r.get("mfu", float("nan")) for r in steps)
    print(f"{mode:8s} {rate:12,.0f} tokens/s  MFU {mfu:.1%}  10B tokens: {1e10 / rate / 3600:.1f} h on one GPU, "
          f"{1e10 / rate / 3600 / 8:.2f} h on eight at the same rate each")
EOF
grep -h "^mfu:" "$WORK/eager.log" || true
