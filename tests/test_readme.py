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


def test_engine_from_python(checkpoint):
    (code,) = [c for c in python_blocks("Serving: an OpenAI-compatible server, and a page") if "Engine(" in c]
    model, tokenizer, _ = load_model(checkpoint)
    scope = {"model": model, "tokenizer": tokenizer, "torch": torch}
    exec(code, scope)
    a, b = scope["a"], scope["b"]
    assert len(a.tokens) == 50 and a.finish_reason == "length"
    assert b.finish_reason == "length" and len(b.tokens) == 20 or b.finish_reason == "stop"
