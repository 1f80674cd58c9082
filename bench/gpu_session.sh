#!/usr/bin/env bash
# One lent GPU session in at most 5 minutes (TOTAL_S, 295 s), so that it can run twice in 15 device-minutes: the
# headline rows of bench/bench_gpu.py, then the CUDA tests of the attention kernels, --compile and training.
# Each part has its own timeout, so one hang cannot eat the session; the tests get what the bench leaves.
# Everything goes to stdout and to $OUT (the device tool copies back what is written there): env.txt,
# bench_gpu.txt, bench_gpu.json (rewritten after every row: a run cut short keeps what it measured), tests.txt.
#
# Assumes the device machines of this workplace: no network, nothing installed for this project, and a plain
# `python3` that has torch with CUDA, transformers and pytest (their image: torch 2.11+cu130, transformers 5.17,
# numpy, regex, safetensors, tqdm, matplotlib, pytest, pytest-xdist). Nothing is carried or installed: minigpt
# runs from this checkout through PYTHONPATH, and nothing is downloaded (the peer is built from a config; the
# speed rows need no tokenizer). Part 1 prints what is there, so that a missing piece shows at once.
#
# Usage: bash bench/gpu_session.sh [bench_gpu.py flags]
#   PARTS="env tests" bash bench/gpu_session.sh      a second run for what the first cut short: the tests alone
#   bash bench/gpu_session.sh --rows rest            a second run of the bench's other rows
# Seconds: ENV_S (15) and BENCH_S (215; the bench starts no row in its last 50) of TOTAL_S (295); the rest is
# the tests'. Expected on an H100 (not yet measured): the bench's headline about 3.5 minutes, most of it
# torch.compile (three compiled models), the tests 1-3 minutes (FlexAttention and inductor compile per shape).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minigpt-gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_S=${TOTAL_S:-295} ENV_S=${ENV_S:-15} BENCH_S=${BENCH_S:-215} PARTS=${PARTS:-env bench tests}
started=$SECONDS
part() { echo "== [$((SECONDS - started)) s] $*"; }
wanted() { [[ " $PARTS " == *" $1 "* ]]; }

if wanted env; then
    part "the machine (timeout $ENV_S s)" | tee "$OUT/env.txt"
    timeout "$ENV_S" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<EOF
import importlib.util, sys, torch, transformers, pytest
print(sys.executable, "python", sys.version.split()[0], "torch", torch.__version__, "transformers",
      transformers.__version__, "pytest", pytest.__version__, "xdist", importlib.util.find_spec("xdist") is not None)
print(torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported(),
      "free GiB", round(torch.cuda.mem_get_info()[0] / 2**30, 1))
EOF' 2>&1 | tee -a "$OUT/env.txt"
fi

# The headline rows (learned sdpa, ALiBi flex, GPT2LMHeadModel; eager, then compiled), then batch-1 decoding. Rows
# that would start after --budget-s are listed as not run, so the bench ends on its own before its timeout.
if wanted bench; then
    part "bench/bench_gpu.py --rows headline (timeout $BENCH_S s)" | tee "$OUT/bench_gpu.txt"
    timeout "$BENCH_S" python3 bench/bench_gpu.py --rows headline --budget-s $((BENCH_S - 50)) \
        --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee -a "$OUT/bench_gpu.txt"
    echo "bench exit status ${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/bench_gpu.txt"
fi

# One file per worker where pytest-xdist is there (most of the time is compilation, which is CPU work); -v prints
# each test as it ends, so a run cut by the timeout still says which passed. The whole log is in tests.txt.
if wanted tests; then
    TESTS_S=$((TOTAL_S - (SECONDS - started)))
    workers=$(python3 -c "import importlib.util as u; print('-n 3 --dist loadfile' if u.find_spec('xdist') else '')")
    part "CUDA tests (timeout $TESTS_S s) $workers" | tee "$OUT/tests.txt"
    MINIGPT_TEST_DEVICE=cuda timeout "$TESTS_S" python3 -m pytest -v -p no:cacheprovider $workers \
        tests/test_attention.py tests/test_compile.py tests/test_static_step.py tests/test_train.py 2>&1 \
        | tee -a "$OUT/tests.txt" | tail -n 40
    echo "tests exit status ${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/tests.txt"
fi
part "done" | tee -a "$OUT/tests.txt"
