"""The GPT-2 124M reproduction: the preset's shape and recipe, --total-batch-tokens, --tokenizer from Hugging Face
files or a hub name, and data preparation on its own (--prepare-only) that says its throughput."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

import train as train_cli
from minigpt import GPT, ConfigError
from minigpt import hf
from minigpt.checkpoint import read_config
from minigpt.config import TrainConfig, with_batch_tokens
from minigpt.hf import open_tokenizer
from minigpt.optim import lr_at
from minigpt.trainer import train
from tokenizer import Tokenizer

from helpers import gpt2_style_tokenizer, records, tiny_config, write_corpus
from test_hf import cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "gpt2-124m.toml"


def test_the_preset_is_gpt2_small_with_llmc_recipe(tmp_path):
    cfg = train_cli.make_config(["--config", str(PRESET), "--out-dir", str(tmp_path)])
    with torch.device("meta"):
        model = GPT(cfg.model.__class__(**{**cfg.model.to_dict(), "vocab_size": 50257}))
    assert model.num_parameters() == 124_439_808  # transformers' GPT2LMHeadModel(GPT2Config()) has as many
    assert cfg.tokenizer == "gpt2" and (cfg.dataset, cfg.dataset_config) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    for gpus, accum in ((1, 16), (8, 2)):
        run = with_batch_tokens(cfg, gpus)
        assert run.grad_accum == accum and run.batch_size * 1024 * accum * gpus == 524_288
    assert 19_073 * 524_288 == pytest.approx(10e9, rel=0.001)  # one pass over sample-10BT's 10B tokens
    lr = [lr_at(step, cfg.lr, cfg.final_lr, cfg.warmup_iters, cfg.max_iters, cfg.lr_schedule, cfg.decay_fraction)
          for step in (357, 715, cfg.max_iters)]
    assert lr == pytest.approx([3e-4, 6e-4, 6e-5], rel=0.01)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)


# ---------------------------------------------------------------------------------------- --total-batch-tokens
def test_total_batch_tokens_sets_grad_accum_per_process_count():
    cfg = TrainConfig(batch_size=4, total_batch_tokens=4 * 64 * 6)  # the default model's context: 64
    assert [with_batch_tokens(cfg, n).grad_accum for n in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert with_batch_tokens(TrainConfig(grad_accum=3), 4).grad_accum == 3  # without it: as given


def test_total_batch_tokens_that_does_not_divide_names_the_numbers():
    with pytest.raises(ConfigError, match=r"--total-batch-tokens 1,536 is not a multiple of --batch-size 4 x "
                                          r"--block-size 64 x 4 process\(es\) = 1,024 tokens per micro-step; use "
                                          r"--batch-size 3 or 6"):
        with_batch_tokens(TrainConfig(batch_size=4, total_batch_tokens=1536), 4)
    with pytest.raises(ConfigError, match="a multiple of 128 \\(block size x processes\\)"):
        with_batch_tokens(TrainConfig(batch_size=4, total_batch_tokens=1000), 2)


def test_bad_batch_tokens_are_one_line_errors_from_the_cli(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=50)
    common = ["--data", str(corpus), "--out-dir", str(tmp_path / "out"), "--batch-size", "4"]
    one_line_error(cli(train_cli.main, *common, "--total-batch-tokens", "1000"), "is not a multiple of")
    one_line_error(cli(train_cli.main, *common, "--total-batch-tokens", "512", "--grad-accum", "2"),
                   "--grad-accum 2 contradicts --total-batch-tokens 512")
    assert not (tmp_path / "out" / "data").exists() or not any((tmp_path / "out" / "data").iterdir())


def test_grad_accum_from_a_config_file_contradicts_total_batch_tokens_too(tmp_path):
    """Not only a --grad-accum flag: a file's grad_accum would be dropped without a word (grad_accum follows from
    total_batch_tokens), so it is refused wherever each of the two comes from."""
    both = tmp_path / "both.toml"
    both.write_text("grad_accum = 4\ntotal_batch_tokens = 2048\nbatch_size = 16\n")
    with pytest.raises(ConfigError, match=r"^--grad-accum 4 \(in .*both.toml\) contradicts --total-batch-tokens 2048"):
        train_cli.make_config(["--config", str(both)])
    accum = tmp_path / "accum.json"
    accum.write_text(json.dumps({"grad_accum": 4}))
    with pytest.raises(ConfigError, match=r"--grad-accum 4 \(in .*accum.json\) contradicts --total-batch-tokens 2048"):
        train_cli.make_config(["--config", str(accum), "--total-batch-tokens", "2048"])


def test_a_run_steps_the_tokens_it_was_asked_for(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tiny_config(corpus, tmp_path / "cache", tmp_path / "out", batch_size=2, total_batch_tokens=2 * 16 * 3,
                      max_iters=2, eval_interval=2, eval_iters=1)
    out = train(cfg)
    assert "96 tokens (2 x 16 x grad_accum 3 x 1 process(es))" in capsys.readouterr().out
    assert json.loads((out / "train_state.json").read_text())["grad_accum"] == 3
    assert records(out, "train")[-1]["step"] == 2
    # its config.json records the grad_accum derived beside total_batch_tokens: a new run from it, and a resume
    again = train_cli.make_config(["--config", str(out / "config.json"), "--out-dir", str(tmp_path / "again")])
    resumed = train_cli.make_config(["--resume", "--out-dir", str(out), "--max-iters", "4"])
    assert [with_batch_tokens(c, 1).grad_accum for c in (again, resumed)] == [3, 3]


# ------------------------------------------------------------------------------------------------- --tokenizer
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """GPT-2's tokenizer files at toy size: tokenizer.json, and vocab.json + merges.txt in a folder of their own."""
    folder = tmp_path_factory.mktemp("hf")
    text = write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", sentences=400).read_text()
    tok = gpt2_style_tokenizer([text], 300)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab_merges").mkdir()
    tok.model.save(str(folder / "vocab_merges"))
    return folder


def test_tokenizer_from_every_kind_of_file(hf_folder, tmp_path):
    reference = HFTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    text = "the cat sees a dog near the red bird, quickly."
    ours = Tokenizer.from_huggingface(hf_folder)
    ours.save(tmp_path / "ours.json")
    (tmp_path / "checkpoint").mkdir()
    ours.save(tmp_path / "checkpoint" / "tokenizer.json")  # a minigpt checkpoint folder holds this
    for spec in (hf_folder, hf_folder / "tokenizer.json", hf_folder / "vocab_merges",
                 hf_folder / "vocab_merges" / "vocab.json", tmp_path / "ours.json", tmp_path / "checkpoint"):
        assert open_tokenizer(str(spec)).encode_ordinary(text) == reference.encode(text).ids, spec


@pytest.mark.parametrize("spec, message", [("missing.json", "no tokenizer file or folder missing.json"),
                                           ("./nowhere/", "no tokenizer file or folder")])
def test_a_tokenizer_that_is_not_there(spec, message):
    with pytest.raises(ConfigError, match=message):
        open_tokenizer(spec)


def test_a_broken_tokenizer_file_is_one_line(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="--tokenizer .*tok.json"):
        open_tokenizer(str(bad))


def test_a_hub_name_without_network_says_what_to_do(tmp_path):
    """The real download path, made to fail as it does offline (HF_HUB_OFFLINE=1 and an empty cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--tokenizer", "openai-community/gpt2",
                             "--out-dir", str(tmp_path / "out"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=120)
    one_line_error(result, "--tokenizer", "openai-community/gpt2", "no network")


def test_a_hub_tokenizer_is_saved_by_its_name(hf_folder, tmp_path, monkeypatch):
    """--tokenizer gpt2 (a hub name, as the preset has it) stays "gpt2" in config.json, not <cwd>/gpt2: a new run
    from that config.json finds it, and a resume that names it again takes the checkpoint's tokenizer without
    asking the hub. (The hub is the local folder here: its download is the one thing faked.)"""
    downloads = []

    def from_the_hub(name, patterns=hf.HUB_FILES):
        downloads.append(str(name))
        return hf_folder

    monkeypatch.setattr(hf, "resolve", from_the_hub)
    monkeypatch.chdir(tmp_path)  # no folder named gpt2 here
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    out = train(tiny_config(corpus, tmp_path / "cache", tmp_path / "out", tokenizer="gpt2", max_iters=2,
                            eval_interval=2, eval_iters=1))
    assert read_config(out)["train"]["tokenizer"] == "gpt2" and downloads == ["gpt2"]
    again = train_cli.make_config(["--config", str(out / "config.json"), "--out-dir", str(tmp_path / "again")])
    assert again.tokenizer == "gpt2"
    assert read_config(train(again))["tokenizer_checksum"] == read_config(out)["tokenizer_checksum"]
    downloads.clear()
    train(train_cli.make_config(["--resume", "--out-dir", str(out), "--tokenizer", "gpt2", "--max-iters", "4"]))
    assert read_config(out)["step"] == 4 and downloads == []  # the same setting: the checkpoint's own tokenizer


# ----------------------------------------------------------------------------------------------- --prepare-only
def test_prepare_only_then_train_reuses_the_tokens(hf_folder, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tiny_config(corpus, tmp_path / "cache", tmp_path / "out", tokenizer=str(hf_folder), max_iters=2,
                      eval_interval=2, eval_iters=1)
    train(TrainConfig(**{**cfg.__dict__, "prepare_only": True}))
    said = capsys.readouterr().out
    assert "encoded 0.0 MB in" in said and " MB/s, " in said and "tokens/s" in said  # its throughput
    assert not (tmp_path / "out" / "model.safetensors").exists()
    folder, = (tmp_path / "cache").glob("corpus-*")
    ids = HFTokenizer.from_file(str(hf_folder / "tokenizer.json")).encode(corpus.read_text()[:40]).ids
    assert list(Tokenizer.load(folder / "tokenizer.json").encode_ordinary(corpus.read_text()[:40])) == ids
    train(cfg)
    assert "reusing prepared data in" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists()
