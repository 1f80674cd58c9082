#!/usr/bin/env bash
# The CUDA paths, checked on a GPU machine (this project's CI has none; results go to BENCHMARKS.md):
#   1. the in-process training tests, run on the GPU (MINIGPT_TEST_DEVICE=cuda; resume exactness, float16 loss
#      scaling, early stopping, Muon), then the attention and compile tests (FlexAttention compiled and training
#      against SDPA, resumed with the other kernel; graph and break counts of a compiled run under inductor);
#   2. one GPU-sized ALiBi model trained side by side in float32, bfloat16 (FlexAttention: auto), bfloat16 with
#      --attention sdpa, float16 (GradScaler) and bfloat16 + compile, float16 interrupted and resumed, and Muon:
#      throughput and validation loss of each;
#   3. sampling and --eval from the float16 checkpoint in float16 and bfloat16, and with --compile (CUDA graphs);
#   4. batch-1 decoding of GPT-2 124M's shape, eager against --compile (bench/bench_decode.py).
# Usage: bash bench/cuda_check.sh [work folder]   (about 6 minutes on one H200)
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/minigpt-cuda}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"

echo "== 1. training tests on the GPU"
MINIGPT_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_train.py \
    tests/test_train_recipe.py tests/test_optim_muon.py 2>&1 | tail -25
MINIGPT_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
    tests/test_compile.py tests/test_static_step.py 2>&1 | tail -25

echo "== 2. one model, four precisions"
SHAPE="--n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 64 --max-bytes 4000000 --no-progress"
COMMON="$SHAPE --data-dir $WORK/data --eval-interval 75 --eval-iters 5 --max-iters 150 --overwrite --device cuda"
run() {  # name, then train.py flags
    local name=$1; shift
    python3 train.py --out-dir "$WORK/$name" $COMMON "$@" >"$WORK/$name.log" 2>&1 || { echo "$name FAILED"; tail -5 "$WORK/$name.log"; }
}
python3 train.py --out-dir "$WORK/prepare" $COMMON --max-iters 1 >"$WORK/prepare.log" 2>&1 || tail -5 "$WORK/prepare.log"
run float32 --dtype float32
run bfloat16 --dtype bfloat16
run bfloat16-sdpa --dtype bfloat16 --attention sdpa
run float16 --dtype float16
run compiled --dtype bfloat16 --compile
run float16-resumed --dtype float16 --max-iters 75 --lr-decay-iters 150
python3 train.py --out-dir "$WORK/float16-resumed" --resume --max-iters 150 --no-progress --device cuda --dtype float16 \
    >>"$WORK/float16-resumed.log" 2>&1 || { echo "resume FAILED"; tail -5 "$WORK/float16-resumed.log"; }
run muon --dtype bfloat16 --optimizer muon
python3 - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| run | steps | tokens/s (median) | val loss | train loss at the end | float16 steps skipped |")
print("|---|---|---|---|---|---|")
for name in ["float32", "bfloat16", "bfloat16-sdpa", "float16", "compiled", "float16-resumed", "muon"]:
    path = work / name / "metrics.jsonl"
    if not path.is_file():
        print(f"| {name} | failed | | | | |"); continue
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    speed = statistics.median(r["tokens_per_sec"] for r in train[len(train) // 4:])
    print(f"| {name} | {train[-1]['step']} | {speed:,.0f} | {evals[-1]['val_loss']:.4f} | {train[-1]['loss']:.4f} | "
          f"{train[-1].get('skipped_steps', '-')} |")
a = [r["loss"] for r in map(json.loads, (work / "float16" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
b = [r["loss"] for r in map(json.loads, (work / "float16-resumed" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
print(f"float16 straight vs interrupted at 75 and resumed: {len(a)} / {len(b)} logged losses, "
      f"largest difference {max((abs(x - y) for x, y in zip(a, b)), default=float('nan')):.2e}")
EOF

echo "== 3. sampling and evaluation from the float16 checkpoint"
head -c 200000 "$(python3 -c 'import json.decoder as m; print(m.__file__)')" >"$WORK/eval.txt"
for dtype in float16 bfloat16 float32; do
    python3 sample.py --out-dir "$WORK/float16" --device cuda --dtype $dtype --eval "$WORK/eval.txt" 2>&1 | tail -1
    python3 sample.py --out-dir "$WORK/float16" --device cuda --dtype $dtype --seed 1 --max-new-tokens 40 \
        --prompt "def " --temperature 0 2>&1 | tail -3
done
python3 sample.py --out-dir "$WORK/float16" --device cuda --seed 1 --max-new-tokens 40 --prompt "def " --temperature 0 \
    --compile 2>&1 | tail -3   # the greedy text of the bfloat16 run above, and its tokens/s

echo "== 4. batch-1 decoding, eager against --compile (CUDA graphs)"
timeout 300 python3 bench/bench_decode.py --device cuda --positions learned alibi --json "$WORK/decode.json"
