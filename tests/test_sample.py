"""sample.py end to end on a tiny checkpoint trained in a fixture: generation, streaming, evaluation, bad input."""
import contextlib
import functools
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from minigpt.checkpoint import load_model
from minigpt.config import DEVICES, DTYPES, GPTConfig, TrainConfig
from minigpt.trainer import train

ROOT = Path(__file__).resolve().parents[1]
EVAL_ITERS, BATCH, BLOCK = 3, 4, 32


def corpus_documents() -> list[str]:
    """Small documents with multi-byte text, so that byte-level tokens split characters."""
    words = ["naïve café", "日本語のテキスト", "emoji 🙂🎉", "def f(x):\n    return x * 2\n", "Ελληνικά", "plain words"]
    return [" ".join(words[(i + j) % len(words)] for j in range(40)) + f" doc {i}\n" for i in range(24)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sample")
    corpus = folder / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(corpus_documents()):
        (corpus / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    cfg = TrainConfig(data=str(corpus), out_dir=str(folder / "out"), vocab_size=300, val_fraction=0.2,
                      model=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK),
                      batch_size=BATCH, max_iters=20, eval_interval=20, eval_iters=EVAL_ITERS, warmup_iters=2,
                      progress=False)
    return Path(train(cfg))


def load_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE_CLI = load_cli()


def sample(run_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run sample.py's entry point in this process (a fresh interpreter per call would cost seconds of imports)."""
    argv = ["sample.py", "--out-dir", str(run_dir), *args]
    stdin_stream = io.TextIOWrapper(io.BytesIO((stdin or "").encode("utf-8")), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", argv), mock.patch.object(sys, "stdin", stdin_stream), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            SAMPLE_CLI.run_cli(SAMPLE_CLI.main)
        except SystemExit as exit_:
            code = exit_.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def sample_json(run_dir: Path, *args: str, stdin: str | None = None) -> dict:
    result = sample(run_dir, "--json", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_produces_the_requested_number_of_tokens_and_seed_reproduces(run_dir):
    first = sample_json(run_dir, "--prompt", "naïve", "--max-new-tokens", "17", "--seed", "3", "--num-samples", "2")
    again = sample_json(run_dir, "--prompt", "naïve", "--max-new-tokens", "17", "--seed", "3", "--num-samples", "2")
    other = sample_json(run_dir, "--prompt", "naïve", "--max-new-tokens", "17", "--seed", "4", "--num-samples", "2")
    assert len(first["samples"]) == 2
    for s in first["samples"]:
        assert (s["tokens"] == 17 and s["finish_reason"] == "length") or s["finish_reason"] == "end_of_text"
    assert [s["text"] for s in first["samples"]] == [s["text"] for s in again["samples"]]
    assert [s["text"] for s in first["samples"]] != [s["text"] for s in other["samples"]]
    assert first["prompt"] == "naïve" and first["settings"]["seed"] == 3


def test_temperature_zero_is_the_greedy_continuation(run_dir):
    out = sample_json(run_dir, "--prompt", "emoji", "--max-new-tokens", "12", "--temperature", "0")
    model, tok, _ = load_model(run_dir)
    idx = torch.tensor([tok.encode_ordinary("emoji")])
    greedy = model.generate(idx, 12, temperature=0, stop_id=tok.eot_id)[0, idx.shape[1]:].tolist()
    if tok.eot_id in greedy:
        greedy = greedy[: greedy.index(tok.eot_id)]
    assert out["samples"][0]["text"] == tok.decode(greedy)
    no_cache = sample_json(run_dir, "--prompt", "emoji", "--max-new-tokens", "12", "--temperature", "0", "--no-cache")
    assert no_cache["samples"][0]["text"] == out["samples"][0]["text"]


def test_streamed_output_equals_the_decoded_text(run_dir):
    args = ("--prompt", "日本", "--max-new-tokens", "40", "--seed", "7", "--temperature", "1.5")
    streamed = sample(run_dir, *args)
    assert streamed.returncode == 0, streamed.stderr
    final = sample_json(run_dir, *args)["samples"][0]["text"]
    assert streamed.stdout == "日本" + final + "\n"
    assert "tokens/s" in streamed.stderr


def test_stop_string_ends_the_sample_before_it(run_dir):
    base = sample_json(run_dir, "--prompt", "café", "--max-new-tokens", "30", "--temperature", "0")
    text = base["samples"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop, text
    cut = sample_json(run_dir, "--prompt", "café", "--max-new-tokens", "30", "--temperature", "0", "--stop", stop)
    assert cut["samples"][0]["text"] == text[: text.index(stop)]
    assert cut["samples"][0]["finish_reason"] == "stop"


def test_prompt_from_stdin_and_file_and_special_text(run_dir, tmp_path):
    from_stdin = sample_json(run_dir, "--prompt", "-", "--max-new-tokens", "3", "--temperature", "0", stdin="plain")
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("plain", encoding="utf-8")
    from_file = sample_json(run_dir, "--prompt-file", str(prompt_file), "--max-new-tokens", "3", "--temperature", "0")
    assert from_stdin["samples"] == [dict(s, seconds=from_stdin["samples"][0]["seconds"]) for s in from_file["samples"]]
    _, tok, _ = load_model(run_dir)
    special = "a<|endoftext|>b"
    plain = sample_json(run_dir, "--prompt", special, "--max-new-tokens", "1")
    allowed = sample_json(run_dir, "--prompt", special, "--max-new-tokens", "1", "--allow-special")
    assert plain["prompt_tokens"] == len(tok.encode_ordinary(special))
    assert allowed["prompt_tokens"] == len(tok.encode(special, allowed_special="all")) < plain["prompt_tokens"]


def test_eval_loss_equals_the_training_loops_validation_loss(run_dir, tmp_path):
    model, tok, config = load_model(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r.get("kind") == "eval"][-1]
    (meta_path,) = (run_dir / "data").glob("*/meta.json")  # the prepared-data header (data/prepare.py)
    meta = json.loads(meta_path.read_text())
    val_tokens = np.fromfile(meta_path.parent / "val.bin", dtype=np.dtype(meta["dtype"]))
    assert len(val_tokens) == meta["tokens"]["val"]
    val_text = tmp_path / "val.txt"
    val_text.write_text(tok.decode(val_tokens.tolist()), encoding="utf-8")
    out = sample_json(run_dir, "--eval", str(val_text), "--allow-special", "--eval-batches", str(EVAL_ITERS),
                      "--batch-size", str(BATCH))
    assert out["block_size"] == BLOCK
    assert out["loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(last_eval["val_bits_per_byte"], rel=1e-5)
    longer = sample_json(run_dir, "--eval", str(val_text), "--allow-special", "--block-size", str(2 * BLOCK))
    assert longer["block_size"] == 2 * BLOCK and np.isfinite(longer["loss"])


def test_eval_reads_what_train_py_reads_and_scores_a_file_shorter_than_a_block(run_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["naïve café plain words doc a\n", "emoji 🙂🎉 Ελληνικά doc b\n", "def f(x):\n    return x * 2\n"]
    joined = tmp_path / "joined.txt"  # the documents joined by end-of-text, as the prepared data holds them
    joined.write_text("<|endoftext|>".join(docs), encoding="utf-8")
    expected = sample_json(run_dir, "--eval", str(joined), "--allow-special", "--block-size", "16")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "folder").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "folder" / f"{i}.txt").write_text(doc, encoding="utf-8")
    pq.write_table(pa.table({"body": docs}), tmp_path / "rows.parquet")
    for path in ("rows.jsonl", "folder", "rows.parquet"):
        got = sample_json(run_dir, "--eval", str(tmp_path / path), "--text-field", "body", "--block-size", "16")
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6), path
        assert got["tokens"] == expected["tokens"]

    model, tok, _ = load_model(run_dir)
    short = tmp_path / "short.txt"
    short.write_text(docs[0], encoding="utf-8")
    ids = tok.encode_ordinary(docs[0])
    assert len(ids) - 1 < BLOCK
    result = sample(run_dir, "--json", "--eval", str(short))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert f"scoring it on one window of {len(ids) - 1}" in result.stderr
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        _, loss = model(x, y)  # the model's own loss on the whole file
    assert out["block_size"] == len(ids) - 1 and out["tokens"] == len(ids) - 1
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait, ".encode("latin-1") * 4)
    one_line_error(sample(run_dir, "--eval", str(bad)), "not valid UTF-8", "--errors replace")
    assert np.isfinite(sample_json(run_dir, "--eval", str(bad), "--errors", "replace")["loss"])
    one_line_error(sample(run_dir, "--eval", str(tmp_path / "missing.txt")), "missing.txt", "check the path")
    one_line_error(sample(run_dir, "--eval", str(tmp_path / "rows.jsonl")), "no field 'text'", "--text-field")


@pytest.mark.parametrize("args, expected", [
    (("--temperature", "-0.5"), "temperature"),
    (("--top-k", "0"), "top_k"),
    (("--top-p", "0"), "top_p"),
    (("--top-p", "1.5"), "top_p"),
    (("--max-new-tokens", "-1"), "max-new-tokens"),
    (("--seed", str(2 ** 64)), "--seed"),  # beyond torch's seeds: was a ValueError traceback
    (("--bogus-flag",), "unrecognized"),
])
def test_bad_sampling_arguments_give_one_line(run_dir, args, expected):
    result = sample(run_dir, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_and_corrupt_checkpoints(run_dir, tmp_path):
    one_line_error(sample(tmp_path / "nowhere"), "no checkpoint folder")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "best", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(sample(broken), "model.safetensors")
    (broken / "model.safetensors").unlink()
    one_line_error(sample(broken), "model.safetensors")


def test_a_hugging_face_folder_as_out_dir_is_told_to_use_init_from(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    one_line_error(sample(tmp_path), "Hugging Face", f"--init-from {tmp_path}")


def test_tokenizer_that_does_not_belong_to_the_model(run_dir, tmp_path):
    from tokenizer import Tokenizer

    other = tmp_path / "other"
    shutil.copytree(run_dir / "best", other)
    Tokenizer.train(" ".join(corpus_documents()), vocab_size=280).save(other / "tokenizer.json")
    one_line_error(sample(other), "tokenizer.json")


def test_prompt_file_that_is_not_utf8(run_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    one_line_error(sample(run_dir, "--prompt-file", str(bad)), "not UTF-8", "offset 3")
    one_line_error(sample(run_dir, "--prompt-file", str(tmp_path / "missing.txt")), "missing.txt")


def test_cli_process_streams_and_reports_user_errors_without_traceback(run_dir):
    """The real command line, in its own process: text on stdout, a summary on stderr, one-line errors."""
    command = [sys.executable, str(ROOT / "sample.py"), "--out-dir", str(run_dir)]
    ok = subprocess.run(command + ["--prompt", "x", "--max-new-tokens", "5", "--seed", "1"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("x") and "tokens/s" in ok.stderr
    bad = subprocess.run(command + ["--top-k", "0"], capture_output=True, text=True, timeout=120)
    one_line_error(bad, "top_k")


def test_stop_strings_understand_escapes_and_keep_other_text():
    assert SAMPLE_CLI.unescape(r"\n\n") == "\n\n"
    assert SAMPLE_CLI.unescape(r"end\t") == "end\t"
    assert SAMPLE_CLI.unescape("naïve 日本 🙂") == "naïve 日本 🙂"


@pytest.mark.parametrize("args, expected", [
    (("--device", "gpu"), "unknown --device"),
    (("--dtype", "float64"), "unknown --dtype"),
    (("--device", "mps"), "MPS is not available"),
])
def test_unknown_device_or_dtype(run_dir, args, expected):
    if args[1] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS: --device mps is valid here")
    one_line_error(sample(run_dir, *args), expected)


def test_float16_sampling_and_evaluation(run_dir, tmp_path):
    """float16 autocast (what an older GPU runs) samples, and scores nearly the float32 loss."""
    half = sample_json(run_dir, "--prompt", "naïve café", "--max-new-tokens", "12", "--seed", "1", "--device", "cpu",
                       "--dtype", "float16")
    assert 0 < half["samples"][0]["tokens"] <= 12 and half["samples"][0]["finish_reason"]
    (tmp_path / "t.txt").write_text(" ".join(corpus_documents()[:3]), encoding="utf-8")
    half, full = (sample_json(run_dir, "--eval", str(tmp_path / "t.txt"), "--device", "cpu", "--dtype", d)
                  for d in ("float16", "float32"))
    assert half["loss"] == pytest.approx(full["loss"], rel=2e-3) and half["loss"] != full["loss"]


def test_flex_attention_samples_and_evaluates_what_sdpa_does(run_dir, tmp_path):
    """The run trained with SDPA (auto, on a CPU) samples and evaluates with FlexAttention (unfused here): the
    kernel is this process's choice, not the checkpoint's. The same greedy text, the same loss."""
    args = ("--prompt", "naïve café", "--max-new-tokens", "16", "--temperature", "0")
    sdpa, flex = (sample_json(run_dir, *args, "--attention", kernel)["samples"][0] for kernel in ("sdpa", "flex"))
    assert flex["text"] == sdpa["text"] and flex["tokens"] == sdpa["tokens"] > 0
    (tmp_path / "t.txt").write_text(" ".join(corpus_documents()[:3]), encoding="utf-8")
    sdpa, flex = (sample_json(run_dir, "--eval", str(tmp_path / "t.txt"), "--attention", kernel)
                  for kernel in ("sdpa", "flex"))
    assert flex["loss"] == pytest.approx(sdpa["loss"], rel=1e-5)
    one_line_error(sample(run_dir, "--attention", "flash"), "invalid choice: 'flash'")


def test_prompt_that_is_not_utf8_on_the_command_line(run_dir):
    one_line_error(sample(run_dir, "--prompt", "caf\udce9"), "not valid UTF-8")


def test_unknown_escape_in_a_stop_string_is_kept_without_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SAMPLE_CLI.unescape(r"\d+") == r"\d+"


def test_a_very_long_prompt_is_cut_to_its_last_contexts_and_says_so(run_dir):
    """An ALiBi model takes any length, but reading a prompt costs memory with the square of its length: past
    PROMPT_CONTEXTS training contexts only its end is read, and stderr says so."""
    model, tok, config = load_model(run_dir)
    assert config["model"]["positions"] == "alibi"
    limit = SAMPLE_CLI.PROMPT_CONTEXTS * BLOCK
    prompt = " ".join(corpus_documents())
    ids = tok.encode_ordinary(prompt)
    assert len(ids) > limit
    result = sample(run_dir, "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert f"the prompt has {len(ids):,} tokens" in result.stderr and f"last {limit:,} tokens" in result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == limit
    greedy = model.generate(torch.tensor([ids[-limit:]]), 8, temperature=0, stop_id=tok.eot_id)[0, limit:].tolist()
    assert out["samples"][0]["text"] == tok.decode(greedy[: greedy.index(tok.eot_id)] if tok.eot_id in greedy
                                                   else greedy)
    short = sample(run_dir, "--prompt", "plain words", "--max-new-tokens", "2")
    assert "note:" not in short.stderr


def test_out_dir_expands_the_home_folder(run_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(run_dir.parent))
    out = sample_json(Path("~") / run_dir.name, "--max-new-tokens", "2")
    assert out["out_dir"] == str(run_dir) and len(out["samples"]) == 1


def test_help_shows_the_defaults_and_choices():
    text = SAMPLE_CLI.build_parser().format_help()
    for fragment in ("(default: 200)", "(default: 0.8)", "(default: out)", "(default: 1)"):
        assert fragment in " ".join(text.split()), fragment
    for flag, values in (("--device", DEVICES), ("--dtype", DTYPES)):
        help_text = next(a.help for a in SAMPLE_CLI.build_parser()._actions if flag in a.option_strings)
        assert all(v in help_text for v in values), help_text


def test_json_records_the_seed_used_and_that_seed_makes_the_sample_again(run_dir):
    args = ("--prompt", "naïve", "--max-new-tokens", "12", "--temperature", "1.5", "--num-samples", "2")
    first = sample_json(run_dir, *args)  # no --seed: one is drawn, and recorded
    seed = first["settings"]["seed"]
    assert isinstance(seed, int)
    again = sample_json(run_dir, *args, "--seed", str(seed))
    assert [s["text"] for s in again["samples"]] == [s["text"] for s in first["samples"]]


def test_sample_k_of_num_samples_is_the_sample_of_seed_plus_k_as_the_servers_choice_k_is(run_dir):
    """Sample k used to continue the generator of the samples before it: it could not be made again alone, and
    differed from choice k of the server's `n` (seeded with seed + k) for the same seed."""
    args = ("--prompt", "naïve", "--max-new-tokens", "12", "--temperature", "1.5")
    together = [s["text"] for s in sample_json(run_dir, *args, "--seed", "7", "--num-samples", "3")["samples"]]
    alone = [sample_json(run_dir, *args, "--seed", str(7 + k))["samples"][0]["text"] for k in range(3)]
    assert together == alone and len(set(alone)) == 3


def test_an_empty_stop_string_is_refused(run_dir):
    one_line_error(sample(run_dir, "--stop", ""), '--stop ""')


def test_int8_with_a_dtype_names_the_dtype_to_leave_out(run_dir):
    one_line_error(sample(run_dir, "--quantize", "int8", "--device", "cpu", "--dtype", "bfloat16"),
                   "--quantize int8 runs in float32; leave out --dtype bfloat16")


def test_compile_samples_what_eager_samples(run_dir, monkeypatch):
    """--compile (its step compiled here through the "aot_eager" backend: a CPU has no CUDA graphs, and inductor's
    C++ build would take long) writes eager's greedy text and seeded samples, past the learned model's window of
    32 tokens (re-primed by a prefill)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    args = ("--prompt", "emoji", "--max-new-tokens", "40", "--seed", "5", "--num-samples", "2")
    try:
        for more in (("--temperature", "0"), ()):
            eager = sample_json(run_dir, *args, *more)
            compiled = sample(run_dir, "--json", *args, *more, "--compile")
            assert "the first tokens wait for the decoding step to compile" in compiled.stderr
            assert [s["text"] for s in json.loads(compiled.stdout)["samples"]] == [s["text"] for s in eager["samples"]]
            assert eager["samples"][0]["tokens"] > BLOCK or eager["samples"][1]["tokens"] > BLOCK
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("args, expected", [
    (("--compile", "--no-cache"), "leave out --no-cache or --compile"),
    (("--compile", "--eval", "some.txt"), "leave it out with --eval"),
    (("--compile", "--quantize", "int8", "--device", "cpu"), "leave out --quantize or --compile"),
])
def test_compile_refuses_what_it_cannot_compile(run_dir, args, expected):
    one_line_error(sample(run_dir, *args), expected)


@pytest.mark.parametrize("args, expected", [
    (("--eval", "t.txt", "--prompt", "x", "--temperature", "0"), "--prompt --temperature do nothing for --eval;"),
    (("--eval", "t.txt", "--seed", "1"), "--seed does nothing for --eval;"),
    (("--eval", "t.txt", "--limit", "3"), "--limit does nothing for --eval;"),
    (("--eval-choices", "c.jsonl", "--block-size", "8"), "--block-size does nothing for --eval-choices;"),
    (("--eval-choices", "c.jsonl", "--max-new-tokens", "5", "--allow-special"), "--allow-special --max-new-tokens do"),
    (("--limit", "3",), "--limit does nothing for sampling (without --eval or --eval-choices); leave it out"),
    (("--block-size", "8", "--batch-size", "2"), "--block-size --batch-size do nothing for sampling"),
])
def test_a_flag_the_use_does_not_read_is_refused_not_dropped(run_dir, args, expected):
    """sample.py samples, evaluates a text (--eval) or scores choices (--eval-choices); a flag of another use would
    have been ignored without a word (a --prompt beside --eval, a --block-size beside --eval-choices)."""
    one_line_error(sample(run_dir, *args), expected)
