"""bench/bench_gpu.py cannot rot: its --smoke run goes through every function of the GPU run on a tiny shape on the
CPU, and the parts a CPU never reaches (a batch that runs out of memory, the time budget) are driven here.

On the CPU the flex training rows are listed as not run, by the same choose_attention that train.py asks: torch
2.13 has no FlexAttention backward there. FlexAttention still runs in the smoke run's ALiBi decoding row (its
prefill, inference only).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
bench_gpu = sys.modules["bench_gpu"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(bench_gpu)

PEAK_TFLOPS = 0.05


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run of every row (about 15 s on one thread), its exit status, stdout and JSON."""
    out = tmp_path_factory.mktemp("bench") / "bench_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--peak-tflops",
                          str(PEAK_TFLOPS), "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    return run, json.loads(out.read_text()) if out.is_file() else None


def test_the_smoke_run_measures_every_row_of_the_plan(smoke):
    run, report = smoke
    assert run.returncode == 0, run.stderr[-3000:]
    headline, rest = bench_gpu.plan()
    assert [r["label"] for r in report["training"]] == [row.label for row in headline + rest]
    assert report["batch_search"]["batch"] == 4  # --smoke's --max-batch: nothing runs out of memory on a CPU
    for r in report["training"]:
        if r["attention"] == "flex":  # see the module's docstring
            assert r["status"].startswith("not run: --attention flex cannot be used here: torch has no "
                                          "FlexAttention backward on cpu"), r
            continue
        assert r["status"] == "ok", r
        assert r["batch"] == 4 and r["tokens_per_step"] == 4 * 32
        assert r["tokens_per_sec_min"] <= r["tokens_per_sec"] <= r["tokens_per_sec_max"]
        assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
        assert r["vocab_size"] == (256 if r["padded_vocab"] else 250)
        with torch.device("meta"):  # the peer's matmuls are ours: MFU counts both by our model's FLOPs
            flops = GPT(GPTConfig(vocab_size=r["vocab_size"], positions="learned", **bench_gpu.SHAPES["smoke"]))\
                .flops_per_token(32)
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_sec"] / (PEAK_TFLOPS * 1e12))
    assert {r["side"] for r in report["training"] if r["status"] == "ok"} == {"ours", "transformers"}
    assert {r["compiled"] for r in report["training"] if r["status"] == "ok"} == {False, True}
    assert report["settings"]["compile_backend"] == "aot_eager"
    assert "| ours | learned | sdpa | compile | 250 | 4 |" in run.stdout


def test_the_smoke_run_decodes_with_the_peers_weights_and_the_same_tokens(smoke):
    _, report = smoke
    decoding = report["decoding"]
    assert decoding["greedy_agreement_float32"] == 1.0
    rows = {r["label"]: r for r in decoding["rows"]}
    for label in ("GPT2LMHeadModel.generate", "ours learned eager", "ours alibi (flex prefill) eager",
                  "ours learned compiled", "ours alibi (flex prefill) compiled"):  # compiled: the static-shape step
        assert rows[label]["status"] == "ok" and rows[label]["tokens_per_sec"] > 0, rows[label]


def test_the_smoke_run_reports_the_ratios_the_goals_name(smoke):
    _, report = smoke
    ratios = {r["ratio"]: r for r in report["ratios"]}
    rate = {r["label"]: r.get("tokens_per_sec") for r in report["training"]}
    eager = ratios["ours / transformers tokens/s, eager (learned, sdpa)"]
    assert eager["value"] == pytest.approx(rate["ours learned sdpa eager"] / rate["GPT2LMHeadModel learned sdpa eager"])
    assert eager["goal"] == 1.3 and eager["met"] == (eager["value"] >= 1.3)
    compiled = ratios["compile / eager tokens/s, ours learned sdpa"]
    assert compiled["value"] == pytest.approx(rate["ours learned sdpa compile"] / rate["ours learned sdpa eager"])
    best_mfu = max(r["mfu"] for r in report["training"] if r["label"].startswith("ours learned sdpa")
                   and not r["padded_vocab"])
    assert [r["value"] for name, r in ratios.items() if name.startswith("MFU / 45 %")] == \
        [pytest.approx(best_mfu / 0.45)]
    # flex did not train on the CPU: the ratio is there, without a value
    assert ratios["ALiBi (flex) / learned (sdpa) tokens/s, eager"]["value"] is None
    decode = {r["label"]: r["tokens_per_sec"] for r in report["decoding"]["rows"]}
    compiled_decoding = ratios["decoding: ours compiled / ours eager tokens/s"]
    assert compiled_decoding["value"] == pytest.approx(decode["ours learned compiled"] / decode["ours learned eager"])
    assert compiled_decoding["goal"] == 3.0 and compiled_decoding["met"] == (compiled_decoding["value"] >= 3.0)


def test_the_batch_search_stops_at_the_first_size_that_runs_out_of_memory():
    tried = []

    def fits(b):
        tried.append(b)
        if b > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")

    largest, tries = bench_gpu.largest_batch(fits, [1, 2, 4, 8, 16, 32, 64])
    assert largest == 8 and tried == [1, 2, 4, 8, 16]
    assert tries[-1] == {"batch": 16, "fits": False}
    assert bench_gpu.largest_batch(fits, [16, 32]) == (None, [{"batch": 16, "fits": False}])


def smoke_bench(**overrides):
    values = dict(device=torch.device("cpu"), amp_dtype=None, shape=bench_gpu.SHAPES["smoke"], vocab_size=250,
                  warmup=1, steps=1, compile_backend="aot_eager", peak_flops=None, budget_s=300.0, batch=8)
    values.update(overrides)
    return bench_gpu.Bench(**values)


def test_a_row_that_runs_out_of_memory_halves_its_batch_and_says_so(monkeypatch):
    real = bench_gpu.run_steps

    def small_memory(bench, model, row, batch_size, vocab_size, flops):
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(bench, model, row, batch_size, vocab_size, flops)

    monkeypatch.setattr(bench_gpu, "run_steps", small_memory)
    result = bench_gpu.measure_training(smoke_bench(), bench_gpu.TrainRow("ours"), {250: 1})
    assert result["batch"] == 2 and result["status"] == "ok at batch 2: out of memory at 8"


def test_rows_past_the_time_budget_are_listed_as_not_run():
    bench = smoke_bench(budget_s=0.0)
    result = bench_gpu.measure_training(bench, bench_gpu.TrainRow("ours"), {250: 1})
    assert result["status"] == "not run: past --budget-s 0" and "tokens_per_sec" not in result
    decoding = bench_gpu.measure_decoding(bench, 4, 8, 1)
    assert {r["status"] for r in decoding["rows"]} == {"not run: past --budget-s 0"}


def test_the_gpu_session_fits_in_five_minutes_and_the_bench_ends_before_its_timeout():
    script = (ROOT / "bench" / "gpu_session.sh").read_text(encoding="utf-8")
    total = int(re.search(r"TOTAL_S=\$\{TOTAL_S:-(\d+)\}", script)[1])
    bench_s = int(re.search(r"BENCH_S=\$\{BENCH_S:-(\d+)\}", script)[1])
    env_s = int(re.search(r"ENV_S=\$\{ENV_S:-(\d+)\}", script)[1])
    margin = int(re.search(r"--budget-s \$\(\(BENCH_S - (\d+)\)\)", script)[1])
    assert total <= 300 and env_s + bench_s < total - 60  # the tests keep at least a minute
    assert 0 < margin < bench_s  # rows stop starting `margin` seconds before the bench's timeout
    assert "MINIGPT_TEST_DEVICE=cuda" in script and '--json "$OUT/bench_gpu.json"' in script
