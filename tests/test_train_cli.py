"""train.py as a user meets it: flags over a config file, and one-line errors that leave checkpoints alone."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import _file_entry, read_config
from minigpt.config import TrainConfig
from minigpt.errors import ConfigError
from minigpt.trainer import train

from helpers import tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
TRAIN_CLI = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(TRAIN_CLI)
TINY = ["--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "8", "--eval-iters", "2", "--no-progress", "--device", "cpu"]


def run(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, its token cache, and a finished checkpoint whose files the failing runs must not touch."""
    root = tmp_path_factory.mktemp("cli")
    corpus, cache = write_corpus(root / "corpus.txt"), root / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = train(tiny_config(corpus, cache, root / "out", max_iters=4, eval_interval=4))
    torch.set_num_threads(threads)
    return corpus, cache, out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and "data" not in p.relative_to(folder).parts}


def test_config_file_then_flags(tmp_path, setup):
    corpus, cache, _ = setup
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{corpus.as_posix()}"\ndata-dir = "{cache.as_posix()}"\nmax_iters = 3\n'
                      f'lr = 0.002\nn_layer = 2\neval_interval = 3\n')
    result = run("--config", config, *TINY, "--n-layer", "1", "--out-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert f"python sample.py --out-dir {tmp_path / 'out'}" in result.stdout
    saved = read_config(tmp_path / "out")
    assert saved["model"]["n_layer"] == 1  # the flag beats the file
    assert saved["train"]["lr"] == 0.002 and saved["train"]["max_iters"] == 3  # the file beats the defaults
    assert saved["model"]["vocab_size"] == 300


def test_resume_takes_settings_from_the_checkpoint(setup, tmp_path):
    corpus, cache, out = setup
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = run("--resume", "--out-dir", copy, "--max-iters", 6, "--no-progress")  # no model flags: from the checkpoint
    assert result.returncode == 0, result.stderr
    assert "resuming from step 4" in result.stdout
    assert read_config(copy)["step"] == 6 and read_config(copy)["model"]["n_embd"] == 32


def test_resume_does_not_take_the_machine_settings_of_the_checkpoint(setup, tmp_path):
    """A run trained on a GPU resumes on a CPU-only machine: device, attention (FlexAttention has no backward on
    a CPU), dtype, compile are this run's own."""
    corpus, cache, out = setup
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["device"] = "cuda"
    config["train"]["compile"] = True
    config["train"]["attention"] = "flex"
    (copy / "config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "manifest.json").read_text())  # as the GPU machine's save would have written it
    manifest["files"]["config.json"] = _file_entry(copy / "config.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run("--resume", "--out-dir", copy, "--max-iters", 5, "--no-progress")
    assert "--device cuda" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert "device: cpu, float32, sdpa attention, 1 process(es)" in result.stdout
    assert read_config(copy)["train"]["attention"] == "auto" and read_config(copy)["step"] == 5


def test_out_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(run("--out-dir", afile), "is a file")


def test_bad_errors_mode():
    assert_one_line_error(run("--errors", "bogus"), "errors must be one of strict, replace, ignore")


def test_unknown_flag():
    assert_one_line_error(run("--n-layers", "3"), "unrecognized arguments: --n-layers")


def test_unknown_config_key(tmp_path):
    (tmp_path / "c.toml").write_text("n_layer = 2\nlearning_rate = 0.1\n")
    assert_one_line_error(run("--config", tmp_path / "c.toml"), "unknown setting(s) learning_rate")


def test_bad_config_value(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": "fast"}))
    assert_one_line_error(run("--config", tmp_path / "c.json"), "lr must be float")


def test_invalid_toml(tmp_path):
    (tmp_path / "c.toml").write_text("n_layer = = 2\n")
    assert_one_line_error(run("--config", tmp_path / "c.toml"), "not valid TOML")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_cuda_without_cuda(setup, tmp_path):
    corpus, cache, _ = setup
    assert_one_line_error(run("--data", corpus, "--data-dir", cache, "--out-dir", tmp_path, *TINY, "--device", "cuda"),
                          "CUDA is not available")


@pytest.mark.parametrize("text,message", [("", "no text"), ("just a few words\nand one more line\n", "tokens")])
def test_empty_or_tiny_corpus_leaves_checkpoint_alone(setup, tmp_path, text, message):
    _, cache, out = setup
    before = snapshot(out)
    (tmp_path / "small.txt").write_text(text)
    result = run("--data", tmp_path / "small.txt", "--data-dir", tmp_path / "cache", "--out-dir", out, "--overwrite",
                 *TINY)
    assert_one_line_error(result, message)
    assert snapshot(out) == before


def test_a_run_that_fails_at_the_start_leaves_no_empty_folders(setup, tmp_path):
    """A missing corpus or a bad --eval-choices file stops the run before it writes anything: the output folder
    (and its parents) that it made for itself go too, while a folder that was there before stays."""
    corpus, cache, out = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 2}\n')
    for wrong in (["--data", tmp_path / "missing.txt"], ["--data", corpus, "--eval-choices", bad]):
        assert_one_line_error(run(*TINY, *wrong, "--out-dir", tmp_path / "new" / "out"))
        assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert_one_line_error(run(*TINY, "--data", tmp_path / "missing.txt", "--out-dir", tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_hugging_face_model_folder_is_never_overwritten(setup, tmp_path, overwrite):
    """An export (or a downloaded model) has a config.json, model.safetensors and tokenizer.json as a checkpoint
    has, but no manifest: a run given that folder as --out-dir replaced all three, without --overwrite."""
    corpus, cache, out = setup
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, text in (("config.json", '{"model_type": "gpt2"}'), ("model.safetensors", "weights"),
                       ("tokenizer.json", "{}"), ("README.md", "model card")):
        (folder / name).write_text(text)
    before = snapshot(folder)
    assert_one_line_error(run(*TINY, "--data", corpus, "--out-dir", folder, "--max-iters", 1, *overwrite),
                          "model.safetensors, config.json, tokenizer.json but no minigpt checkpoint")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in before)


def test_block_size_larger_than_data(setup, tmp_path):
    corpus, cache, out = setup
    before = snapshot(out)
    result = run("--data", corpus, "--data-dir", cache, "--out-dir", out, "--overwrite", *TINY, "--block-size", 4096)
    assert_one_line_error(result, "block")
    assert snapshot(out) == before


def test_resume_with_a_different_model(setup):
    corpus, cache, out = setup
    before = snapshot(out)
    assert_one_line_error(run("--resume", "--out-dir", out, "--n-embd", 64, "--no-progress"),
                          "different model", "n_embd=32")
    assert snapshot(out) == before


def test_resume_refuses_an_init_from_the_checkpoint_did_not_start_from(setup, tmp_path):
    """--init-from on --resume would change nothing but the record of where the model came from: refused, and
    the value the checkpoint has (none here) is accepted."""
    corpus, cache, out = setup
    with pytest.raises(ConfigError, match="contradicts the checkpoint .* trained from scratch"):
        TRAIN_CLI.make_config(["--resume", "--out-dir", str(out), "--init-from", str(tmp_path)])
    assert TRAIN_CLI.make_config(["--resume", "--out-dir", str(out), "--init-from", ""]).init_from in (None, "")


def test_resume_refuses_another_seed(setup):
    """The resumed run continues the checkpoint's random streams: another --seed changed only config.json."""
    corpus, cache, out = setup
    with pytest.raises(ConfigError, match="--seed 5 contradicts the checkpoint .* trained with --seed 1337"):
        TRAIN_CLI.make_config(["--resume", "--out-dir", str(out), "--seed", "5"])
    assert TRAIN_CLI.make_config(["--resume", "--out-dir", str(out), "--seed", "1337"]).seed == 1337


def test_resume_without_checkpoint(tmp_path):
    assert_one_line_error(run("--resume", "--out-dir", tmp_path / "none"), "no checkpoint folder")


def test_resume_from_corrupt_checkpoint(setup, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(setup[2], copy)
    model = copy / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert_one_line_error(run("--resume", "--out-dir", copy), "truncated or corrupt")
    (copy / "config.json").write_text("{garbage")
    assert_one_line_error(run("--resume", "--out-dir", copy), "config.json")


@pytest.mark.parametrize("name", ["out_dir", "data_dir"])
def test_output_folder_whose_parent_is_a_file(setup, tmp_path, name):
    corpus, cache, _ = setup
    (tmp_path / "afile").write_text("x")
    folders = {"out": tmp_path / "out", "cache": cache, name.split("_")[0]: tmp_path / "afile" / "sub"}
    with pytest.raises(ConfigError, match=f"cannot create --{name.replace('_', '-')} .*afile/sub"):
        train(tiny_config(corpus, folders["cache"] if name == "out_dir" else folders["data"], folders["out"]))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_folder_in_proc():
    assert_one_line_error(run("--out-dir", "/proc/nope"), "cannot create --out-dir /proc/nope")


def test_home_folder_and_spaces_in_paths(setup, tmp_path, monkeypatch, capsys):
    """`~` in a config file's and a flag's path means the home folder; the hints quote a path with spaces."""
    corpus, cache, _ = setup
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "run.toml").write_text('out-dir = "~/my run"\n[train]\nmax_iters = 2\neval_interval = 2\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "~/../run.toml", "--data", str(corpus),
                                      "--data-dir", "~/cache", *TINY])
    assert TRAIN_CLI.main() == 0
    assert read_config(home / "my run")["step"] == 2 and (home / "cache").is_dir()
    assert not (tmp_path / "~").exists()
    said = capsys.readouterr().out
    assert f"python sample.py --out-dir '{home / 'my run'}'" in said
    assert f"python train.py --resume --out-dir '{home / 'my run'}'" in said


def test_dataset_with_data_files_is_accepted():
    """--dataset json --data FILES, as the README documents (the data layer gives the builder the files)."""
    cfg = TRAIN_CLI.make_config(["--dataset", "json", "--data", "texts.jsonl"])
    assert (cfg.dataset, cfg.data) == ("json", "texts.jsonl")


def test_help_lists_the_choices_of_every_choice_flag():
    from minigpt.config import CHOICES

    parser = TRAIN_CLI.build_parser()
    helps = {a.dest: a.help for a in parser._actions}
    for name, allowed in CHOICES.items():
        assert all(value in helps[name] for value in allowed), (name, helps[name])
        if name != "pattern":  # which also takes any regex (the tokenizer checks it)
            with pytest.raises(ConfigError, match=f"{name} must be one of {', '.join(allowed)}"):
                TRAIN_CLI.make_config([f"--{name.replace('_', '-')}", "bogus-value"])
    assert "cuda:N" in helps["device"] and "regex" in helps["pattern"]


def test_choices_match_the_packages_that_read_them():
    from data.sources import ERROR_MODES
    from minigpt.config import CHOICES
    from tokenizer.patterns import PATTERNS

    assert CHOICES["errors"] == ERROR_MODES and set(CHOICES["pattern"]) == set(PATTERNS)


def test_config_file_with_model_and_train_tables(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nn_layer = 3\npositions = "learned"\n[train]\nlr = 0.002\n')
    cfg = TRAIN_CLI.make_config(["--config", str(tmp_path / "c.toml"), "--lr", "0.003"])
    assert (cfg.model.n_layer, cfg.model.positions, cfg.lr) == (3, "learned", 0.003)


def test_config_file_may_be_a_checkpoints_config(setup, tmp_path):
    """A new run with the settings of a trained one, written elsewhere: its out_dir is not taken."""
    _, _, out = setup
    saved = read_config(out)
    cfg = TRAIN_CLI.make_config(["--config", str(out / "config.json"), "--out-dir", str(tmp_path / "new")])
    assert cfg.model.to_dict() == {**saved["model"], "vocab_size": cfg.model.vocab_size}
    assert cfg.vocab_size == saved["train"]["vocab_size"] and cfg.max_iters == saved["train"]["max_iters"]
    assert cfg.out_dir == str(tmp_path / "new")
    assert TRAIN_CLI.make_config(["--config", str(out / "config.json")]).out_dir == TrainConfig().out_dir


def test_unknown_config_key_suggests_the_known_one(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\nn_layers = 2\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) n_layers \(did you mean n_layer\?\)"):
        TRAIN_CLI.make_config(["--config", str(tmp_path / "c.toml")])


def test_vocab_size_with_a_given_tokenizer_is_reported(capsys):
    TRAIN_CLI.make_config(["--tokenizer", "tok.json", "--vocab-size", "500"])
    assert "note: --vocab-size ignored: the vocabulary comes from --tokenizer tok.json" in capsys.readouterr().err
    TRAIN_CLI.make_config(["--vocab-size", "500"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args,message", [
    (("--label-smoothing", "1"), "label_smoothing must be in [0, 1), got 1.0"),
    (("--label-smoothing", "-0.1"), "label_smoothing must be in [0, 1)"),
    (("--patience", "0"), "patience must be a positive integer, got 0"),
    (("--min-delta", "-0.01"), "min_delta must be >= 0"),
    (("--max-time", "ten"), "max_time must be a positive duration such as 90s, 10m or 1.5h"),
    (("--max-time", "10m", "--lr-decay-iters", "500"), "give max_time or lr_decay_iters, not both"),
    (("--lr-schedule", "exponential"), "lr_schedule must be one of cosine, linear, constant, wsd; got 'exponential'"),
    (("--decay-fraction", "0"), "decay_fraction must be in (0, 1]"),
    (("--dtype", "float64"), "dtype must be one of auto, float32, bfloat16, float16"),
])
def test_bad_recipe_settings(args, message):
    with pytest.raises(ConfigError) as error:
        TRAIN_CLI.make_config(list(args))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_recipe_setting_is_one_line_from_the_command_line():
    assert_one_line_error(run("--max-time", "1h30m"), "max_time must be a positive duration", "got '1h30m'")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS: --device mps is valid here")
def test_mps_without_mps(setup, tmp_path):
    corpus, cache, _ = setup
    assert_one_line_error(run("--data", corpus, "--data-dir", cache, "--out-dir", tmp_path, *TINY, "--device", "mps"),
                          "--device mps was given but MPS is not available", "use --device cpu")


def test_time_budget_from_the_command_line_and_its_resume(setup, tmp_path):
    """--max-time with the other recipe flags; the planned step count is what --resume continues to."""
    corpus, cache, _ = setup
    result = run("--data", corpus, "--data-dir", cache, "--out-dir", tmp_path / "out", *TINY, "--max-time", "3s",
                 "--warmup-iters", "5", "--eval-interval", "1000", "--label-smoothing", "0.1", "--lr-schedule", "wsd",
                 "--dtype", "float16", "--patience", "2")
    assert result.returncode == 0, result.stderr
    saved = read_config(tmp_path / "out")
    steps = saved["train"]["max_iters"]
    assert saved["step"] == steps and re.search(r"leave time for \d+ steps in all", result.stdout)
    assert "float16 autocast with loss scaling" in result.stdout and "% of the 3s budget" in result.stdout
    assert {k: saved["train"][k] for k in ("max_time", "label_smoothing", "lr_schedule", "patience")} == \
        {"max_time": "3s", "label_smoothing": 0.1, "lr_schedule": "wsd", "patience": 2}
    again = run("--resume", "--out-dir", tmp_path / "out", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"already at step {steps} of --max-iters {steps}: nothing to do" in again.stdout
    assert "time budget" not in again.stdout
    assert read_config(tmp_path / "out")["step"] == steps


def test_decay_fraction_without_the_wsd_schedule_is_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="--decay-fraction shapes only --lr-schedule wsd .* the schedule here is "
                                          "cosine: add --lr-schedule wsd, or leave --decay-fraction out"):
        TRAIN_CLI.make_config(["--decay-fraction", "0.3"])
    (tmp_path / "c.toml").write_text('lr_schedule = "linear"\ndecay_fraction = 0.3\n')
    with pytest.raises(ConfigError, match="the schedule here is linear"):
        TRAIN_CLI.make_config(["--config", str(tmp_path / "c.toml")])
    assert TRAIN_CLI.make_config(["--decay-fraction", "0.3", "--lr-schedule", "wsd"]).decay_fraction == 0.3
    _, _, out = setup  # a checkpoint's config.json records every setting: its decay_fraction was not asked for
    assert TRAIN_CLI.make_config(["--config", str(out / "config.json"), "--out-dir", str(tmp_path / "new")]).lr_schedule \
        == "cosine"


@pytest.mark.parametrize("args, message", [
    (("--min-delta", "0.1"), "--min-delta shapes only early stopping .*; early stopping is off: add --patience N"),
    (("--muon-lr", "0.05"), "--muon-lr shapes only --optimizer muon .*; the optimizer here is adamw: add --optimizer"),
    (("--lr-schedule", "constant", "--min-lr", "1e-4"), "--min-lr shapes only a schedule that decays"),
    (("--lr-schedule", "constant", "--lr-decay-iters", "10"),
     "--lr-decay-iters shapes only .* schedule here is constant"),
    (("--mlp", "relu2", "--activation", "gelu_tanh"), "--activation shapes only --mlp gelu .*; the MLP here is relu2"),
])
def test_a_setting_that_would_do_nothing_is_refused(args, message):
    """Each of these trained as if it had not been given (and config.json recorded it as if it had applied)."""
    with pytest.raises(ConfigError, match=message):
        TRAIN_CLI.make_config(list(args))


def test_the_settings_that_would_do_nothing_pass_where_they_apply():
    cfg = TRAIN_CLI.make_config(["--min-delta", "0.1", "--patience", "2", "--optimizer", "muon", "--muon-lr", "0.05",
                                 "--min-lr", "1e-4", "--lr-decay-iters", "10", "--activation", "gelu_tanh"])
    assert (cfg.min_delta, cfg.muon_lr, cfg.min_lr, cfg.lr_decay_iters, cfg.model.activation) == \
        (0.1, 0.05, 1e-4, 10, "gelu_tanh")
