"""Hugging Face in and out, judged by `transformers`: pretrained GPT-2 folders load with its logits, and exported
checkpoints load in `transformers` with ours."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import train as train_cli
from minigpt import GPT, CheckpointError, ConfigError, GPTConfig
from minigpt import hf
from minigpt.checkpoint import load_model, save_checkpoint
from minigpt.errors import run_cli
from minigpt.export import main as export_main
from minigpt.export import save_hf_folder
from minigpt.quantize import quantize_int8
from tokenizer import Tokenizer

from helpers import gpt2_style_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The cat sees a dog.\n\ndef f(x):\n    return x  # 😀 emoji, 你好,   spaces\t\ttabs\n" * 3
VOCAB = 400


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """What the hub's GPT-2 folders hold, at toy size: a random GPT2LMHeadModel saved by save_pretrained, and a
    byte-level BPE trained by `tokenizers` saved as tokenizer.json and as vocab.json + merges.txt."""
    folder = tmp_path_factory.mktemp("gpt2")
    tok = gpt2_style_tokenizer([p.read_text(encoding="utf-8") for p in sorted((ROOT / "minigpt").glob("*.py"))], VOCAB)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 8, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))  # 8 padding rows, as vocabularies often have
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def reference(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def cli(main, *argv: str) -> subprocess.CompletedProcess:
    """Run a CLI entry point in this process through run_cli; returns code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["prog", *argv]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            run_cli(main)
        except SystemExit as exit_:
            code = exit_.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def sample_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------------------------------ import
def test_pretrained_logits_and_greedy_continuation_equal_transformers(gpt2_dir):
    ours, theirs = GPT.from_pretrained(str(gpt2_dir)), reference(gpt2_dir)
    assert ours.config.activation == "gelu_tanh" and ours.config.positions == "learned"
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max() <= 1e-4
    prompt = idx[:1, :8]
    expected = theirs.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 30, temperature=0), expected)


def test_sharded_safetensors_load(gpt2_dir, tmp_path):
    reference(gpt2_dir).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    idx = torch.arange(20)[None] % VOCAB
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(str(tmp_path))(idx)[0], GPT.from_pretrained(str(gpt2_dir))(idx)[0])


def test_tokenizer_of_the_folder_gives_transformers_ids(gpt2_dir):
    theirs = AutoTokenizer.from_pretrained(gpt2_dir)
    ours = hf.load_tokenizer(str(gpt2_dir))
    assert ours.encode(TEXT, allowed_special="all") == theirs(TEXT)["input_ids"]
    assert Tokenizer.from_huggingface(gpt2_dir / "vocab.json").encode_ordinary(TEXT) == theirs(TEXT)["input_ids"]


def test_bad_folders_are_one_line_errors(gpt2_dir, tmp_path):
    sample = sample_cli()
    (tmp_path / "empty").mkdir()
    one_line_error(cli(sample, "--init-from", str(tmp_path / "empty")), "no config.json")
    (tmp_path / "falcon").mkdir()
    (tmp_path / "falcon" / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    one_line_error(cli(sample, "--init-from", str(tmp_path / "falcon")), "'falcon'", "gpt2")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # transformers' defaults
    one_line_error(cli(sample, "--init-from", str(tmp_path / "llama")), "intermediate_size=11008")
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    one_line_error(cli(sample, "--init-from", str(pickle)), "pytorch_model.bin", "safetensors")
    (pickle / "pytorch_model.bin").unlink()
    one_line_error(cli(sample, "--init-from", str(pickle)), "no model.safetensors")
    one_line_error(cli(sample, "--init-from", str(tmp_path / "nowhere/")), "not a folder")
    relu = tmp_path / "relu"
    relu.mkdir()
    (relu / "config.json").write_text(json.dumps({"model_type": "gpt2", "activation_function": "relu"}))
    one_line_error(cli(sample, "--init-from", str(relu)), "activation_function='relu'")


def test_tokenizer_larger_than_the_embedding_is_refused(gpt2_dir, tmp_path):
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    assert hf.load_tokenizer(str(tmp_path)).vocab_size == VOCAB < config["vocab_size"]  # fewer: fine
    with pytest.raises(CheckpointError, match=f"{VOCAB} tokens but the model's embedding has only {VOCAB - 1} rows"):
        hf.load_tokenizer(str(tmp_path), vocab_size=VOCAB - 1)


def test_unreachable_hub_name_says_what_to_do(tmp_path):
    """The real download path, made to fail as it does on a machine without network (HF_HUB_OFFLINE=1, and an
    empty cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init-from", "openai-community/gpt2"],
                            capture_output=True, text=True, env=env, timeout=120)
    one_line_error(result, "openai-community/gpt2", "no network", "pass its path")


# ------------------------------------------------------------------------------------------------- finetuning
def test_finetune_from_pretrained_crops_positions_and_resumes(gpt2_dir, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=400)
    out = tmp_path / "ft"
    common = ["--init-from", str(gpt2_dir), "--data", str(corpus), "--out-dir", str(out), "--batch-size", "2",
              "--eval-iters", "1", "--eval-interval", "1", "--log-interval", "1", "--no-progress", "--device", "cpu"]
    with pytest.raises(ConfigError, match="--n-layer 3 contradicts"):
        train_cli.make_config(common + ["--n-layer", "3"])
    with pytest.raises(ConfigError, match="--block-size 49 is longer than the 48"):
        train_cli.make_config(common + ["--block-size", "49"])
    with pytest.raises(ConfigError, match="--vocab-size contradicts --init-from"):
        train_cli.make_config(common + ["--vocab-size", "300"])
    # a learning rate so small that the saved weights are the pretrained ones (to float32 rounding)
    cfg = train_cli.make_config(common + ["--block-size", "16", "--dropout", "0.1", "--max-iters", "1",
                                          "--lr", "1e-12", "--min-lr", "0", "--warmup-iters", "0"])
    from minigpt.trainer import train

    train(cfg)
    model, tok, config = load_model(out)
    assert config["model"]["block_size"] == 16 and config["model"]["dropout"] == 0.1
    assert tok == hf.load_tokenizer(str(gpt2_dir)) and model.config.vocab_size == VOCAB + 8
    idx = torch.tensor([tok.encode_ordinary(TEXT)[:16]])
    with torch.no_grad():
        assert (model(idx)[0] - reference(gpt2_dir)(idx).logits).abs().max() <= 1e-4
    resumed = train_cli.make_config(["--resume", "--out-dir", str(out), "--max-iters", "2", "--no-progress"])
    assert resumed.init_from == str(gpt2_dir) and resumed.model.block_size == 16
    with pytest.raises(ConfigError, match=f"contradicts the checkpoint .* finetuned from {gpt2_dir}"):
        train_cli.make_config(["--resume", "--out-dir", str(out), "--init-from", str(tmp_path)])
    monkeypatch.chdir(gpt2_dir.parent)  # the same folder given relative to where the command runs is the same start
    assert train_cli.make_config(["--resume", "--out-dir", str(out), "--init-from", gpt2_dir.name]).init_from
    train(resumed)
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    # and the finetuned model goes back to transformers: its ids (the file's numbering) and its logits
    model, tok, _ = load_model(out)
    assert cli(export_main, str(out), str(tmp_path / "hf")).returncode == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT)["input_ids"] == tok.encode_ordinary(TEXT)
    with torch.no_grad():
        assert (model(idx)[0] - reference(tmp_path / "hf")(idx).logits).abs().max() <= 1e-4


def test_a_finetunes_config_starts_a_new_run(gpt2_dir, tmp_path):
    """`train.py --config ft/config.json --out-dir again`: the tokenizer settings a finetune's config.json records
    are not given ones (its tokenizer is the pretrained model's), so they contradict nothing."""
    from minigpt.trainer import train

    corpus = write_corpus(tmp_path / "corpus.txt", sentences=400)
    ft = train_cli.make_config(["--init-from", str(gpt2_dir), "--data", str(corpus), "--out-dir", str(tmp_path / "ft"),
                                "--block-size", "16", "--batch-size", "2", "--max-iters", "1", "--eval-iters", "1",
                                "--eval-interval", "1", "--no-progress", "--device", "cpu"])
    train(ft)
    again = train_cli.make_config(["--config", str(tmp_path / "ft" / "config.json"), "--out-dir",
                                   str(tmp_path / "again")])
    assert (again.init_from, again.tokenizer, again.model) == (str(gpt2_dir), None, ft.model)
    train(again)
    assert load_model(tmp_path / "again")[2]["step"] == 1


# ------------------------------------------------------------------------------------- our own folders, read back
def test_from_pretrained_reads_a_minigpt_checkpoint_and_the_hf_paths_say_what_does(tmp_path):
    tok = Tokenizer.train(TEXT * 20, vocab_size=300, progress=False, num_proc=1)
    torch.manual_seed(0)
    trained = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16,
                            positions="learned")).eval()
    save_checkpoint(tmp_path / "out", trained, tok, {"model": trained.config.to_dict(), "train": {}, "step": 0})
    idx = torch.tensor([tok.encode_ordinary(TEXT)[:20]])
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(str(tmp_path / "out"))(idx)[0], trained(idx)[0])
        shorter = GPT.from_pretrained(str(tmp_path / "out"), block_size=20, dropout=0.1)
        assert shorter.config.block_size == 20 and shorter.config.dropout == 0.1 and not shorter.training
        assert torch.equal(shorter(idx)[0], trained(idx)[0])
    with pytest.raises(ConfigError, match="--block-size 25 is longer than the 24 positions"):
        GPT.from_pretrained(str(tmp_path / "out"), block_size=25)
    result = cli(sample_cli(), "--init-from", str(tmp_path / "out"), "--prompt", "The", "--max-new-tokens", "3",
                 "--seed", "0", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # finetuning reads Hugging Face folders only: the message says what reads ours
    with pytest.raises(CheckpointError, match="is a minigpt checkpoint.*sample.py --out-dir.*minigpt.export"):
        hf.pretrained_config(str(tmp_path / "out"), {})


def test_llama_and_qwen3_folders_other_than_ours_are_refused_naming_the_setting(tmp_path):
    tok = Tokenizer.train(TEXT * 20, vocab_size=300, progress=False, num_proc=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=24, bias=False,
                          positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)).eval()
    save_hf_folder(model, tok, tmp_path / "qwen3")
    config = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    assert GPT.from_pretrained(str(tmp_path / "qwen3")).config == model.config
    for change, words in [({"num_key_value_heads": 1}, "grouped-query attention"),
                          ({"rms_norm_eps": 1e-6}, "norm epsilon of 1e-06"),
                          ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "RoPE other than"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE other than"),
                          ({"intermediate_size": 96}, "intermediate_size=96"),
                          ({"head_dim": 16}, "head_dim=16"),
                          ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                          ({"attention_bias": True}, "biases"),
                          ({"model_type": "falcon"}, "'falcon'")]:
        (tmp_path / "qwen3" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=words):
            GPT.from_pretrained(str(tmp_path / "qwen3"))


# --------------------------------------------------------------------------------------------------- int8
def test_int8_weights_stay_close_and_sample(gpt2_dir):
    model = GPT.from_pretrained(str(gpt2_dir))
    quantized = quantize_int8(model)
    assert isinstance(quantized.blocks[0].mlp.fc, torch.ao.nn.quantized.dynamic.Linear)
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact, approx = model(idx)[0], quantized(idx)[0]
    error = (exact - approx).pow(2).mean().sqrt()  # int8 weights and (dynamically) int8 activations: a few %
    assert 0 < error <= 0.1 * exact.std()
    result = cli(sample_cli(), "--init-from", str(gpt2_dir), "--quantize", "int8", "--prompt", "def",
                 "--max-new-tokens", "5", "--seed", "0", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"][0]["tokens"] == 5
