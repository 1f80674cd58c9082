"""Two CPU processes under torchrun (gloo) train like one process with twice the gradient accumulation."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from minigpt.checkpoint import load_model
from minigpt.trainer import train

from helpers import tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]

# Runs train.py as torchrun would, then reports the threads left when it exits: native threads that Python does
# not know of would be gloo's workers, alive during interpreter shutdown, where they can abort the process.
TRAIN_AND_COUNT_THREADS = """
import os, runpy, sys, threading
sys.argv[0] = {train!r}
try:
    runpy.run_path({train!r}, run_name="__main__")
finally:
    native = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1  # Linux lists them
    print(f"rank {{os.environ['RANK']}} threads at exit: {{native}} native, {{threading.active_count()}} python", flush=True)
"""

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if r["kind"] == "train"],
            [loss for r in records if r["kind"] == "eval" for loss in (r["train_loss"], r["val_loss"])])


# The default model with AdamW, and every switch with Muon (its own optimizer state and step under DDP).
DEFAULT = ({}, {}, [])
MODERN = ({"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True}, {"optimizer": "muon"},
          ["--positions", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--qk-norm", "--optimizer", "muon"])


@pytest.mark.parametrize("model, settings, switch_flags", [DEFAULT, MODERN], ids=["default", "modern+muon"])
def test_two_processes_match_one_process_with_double_accumulation(tmp_path, model, settings, switch_flags):
    corpus, cache = write_corpus(tmp_path / "corpus.txt"), tmp_path / "cache"
    common = dict(max_iters=12, eval_interval=6, batch_size=4, lr=3e-3, **settings)
    single = train(tiny_config(corpus, cache, tmp_path / "single", model, grad_accum=2, **common))

    # its own --data-dir: both ranks find no prepared data, so one prepares while the other waits for it
    flags = ["--data", corpus, "--data-dir", tmp_path / "ddp-cache", "--out-dir", tmp_path / "ddp", "--vocab-size", 300,
             "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--block-size", 16, "--batch-size", 4, "--grad-accum", 1,
             "--max-iters", 12, "--eval-interval", 6, "--eval-iters", 4, "--log-interval", 1, "--lr", 3e-3,
             "--min-lr", 3e-4, "--warmup-iters", 3, "--no-progress", "--device", "cpu", *switch_flags]
    launcher = tmp_path / "train_and_count_threads.py"
    launcher.write_text(TRAIN_AND_COUNT_THREADS.format(train=str(ROOT / "train.py")))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(launcher), *map(str, flags)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    threads = re.findall(r"rank (\d) threads at exit: (-?\d+) native, (\d+) python", result.stdout)
    assert sorted(rank for rank, _, _ in threads) == ["0", "1"], result.stdout[-2000:]
    if sys.platform.startswith("linux"):  # the process group is really gone
        assert all(native == python for _, native, python in threads), threads
    assert result.stdout.count("step 12: train loss") == 1  # only rank 0 logs
    # one report of the prepared data ("prepared ..." or "reusing ..."), from rank 0 whichever rank prepared it
    assert len(re.findall(r"train \+ [\d,]+ val tokens", result.stdout)) == 1, result.stdout[:2000]

    (single_steps, single_evals), (ddp_steps, ddp_evals) = losses(single), losses(tmp_path / "ddp")
    assert len(ddp_steps) == len(single_steps) == 12
    assert ddp_steps == pytest.approx(single_steps, rel=1e-5)
    assert ddp_evals == pytest.approx(single_evals, rel=1e-5)
    assert ddp_steps[-1] < ddp_steps[0]  # and it learned something
    a, b = load_model(single)[0], load_model(tmp_path / "ddp")[0]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.detach().allclose(q.detach(), rtol=1e-4, atol=1e-6), name
