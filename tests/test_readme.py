"""The README's Python for models runs as written, against a small checkpoint (the tokenizer's is tested beside
the tokenizer)."""
import re
import textwrap
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.checkpoint import load_model, save_checkpoint
from tokenizer import Tokenizer

from helpers import WORDS

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section_title: str) -> list[str]:
    """The ```python blocks of one `## ` section (indented ones in list items too), dedented."""
    section = README.read_text(encoding="utf-8").split(f"\n## {section_title}\n", 1)[1].split("\n## ", 1)[0]
    return [textwrap.dedent(code) for _, code in re.findall(r"^( *)```python\n(.*?)^\1```", section, re.M | re.S)]


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A small checkpoint in ./out, tied head (the default), so that the README's relative paths find it."""
    text = " ".join(WORDS * 20) + "\ndef fibonacci(n):\n    return n\n"
    tok = Tokenizer.train([text], vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "out", model, tok, {"model": model.config.to_dict(), "train": {}, "step": 0})
    monkeypatch.chdir(tmp_path)
    return tmp_path / "out"


def test_model_from_python(checkpoint, capsys):
    (code,) = python_blocks("The model from Python")
    scope: dict = {}
    exec(code, scope)
    prompt, out, loss = scope["prompt"], scope["out"], scope["loss"]
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt)
    assert capsys.readouterr().out.startswith("def fibonacci(n):")
    assert torch.isfinite(loss) and scope["fresh"].config.n_embd == 64
    assert scope["model"].attention == "sdpa"


def test_raw_safetensors_recipe_rebuilds_the_model(checkpoint):
    """Read with safetensors and json alone, the weights load into the model strictly, tied head included."""
    (code,) = [c for c in python_blocks("File formats") if "load_file" in c]
    scope: dict = {}
    exec(code, scope)
    model = GPT(GPTConfig(**scope["config"]))
    model.load_state_dict(scope["weights"], strict=True)
    reference = load_model(checkpoint)[0]
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_defaults_the_readme_names_are_the_configs():
    from minigpt.config import TrainConfig

    def default(flag: str) -> str:
        name, config = flag.replace("-", "_"), TrainConfig()
        return str(getattr(config.model if hasattr(config.model, name) else config, name))

    text = README.read_text(encoding="utf-8")
    named = re.findall(r"the default `--([a-z-]+) ([^`]+)`", text) + \
        re.findall(r"`--([a-z-]+) [^`]+` \(the default is ([^)]+)\)", text)
    assert named
    assert [(flag, value) for flag, value in named if default(flag) != value] == []


def test_the_default_runs_result_is_the_same_in_the_introduction_and_the_benchmark_table():
    text = README.read_text(encoding="utf-8")
    intro = re.search(r"validation loss [0-9.]+ nats/token, ([0-9.]+) bits per byte", text)[1]
    row = re.search(r"^\| default run `python train.py` \|[^|]*?([0-9.]+) bits per byte", text, re.M)[1]
    assert intro == row


def test_the_cuda_check_resumes_a_run_in_the_precision_it_was_trained_in():
    script = (README.parent / "bench" / "cuda_check.sh").read_text(encoding="utf-8")
    trained = dict(re.findall(r"^run ([\w-]+) .*--dtype (\w+)", script, re.M))
    resumed = re.findall(r'train\.py --out-dir "\$WORK/([\w-]+)" --resume (.*)', script)
    assert resumed
    for name, flags in resumed:
        assert f"--dtype {trained[name]}" in flags, (name, flags)


def test_engine_from_python(checkpoint):
    (code,) = [c for c in python_blocks("Serving: an OpenAI-compatible server, and a page") if "Engine(" in c]
    model, tokenizer, _ = load_model(checkpoint)
    scope = {"model": model, "tokenizer": tokenizer, "torch": torch}
    exec(code, scope)
    a, b = scope["a"], scope["b"]
    assert len(a.tokens) == 50 and a.finish_reason == "length"
    assert b.finish_reason == "length" and len(b.tokens) == 20 or b.finish_reason == "stop"
