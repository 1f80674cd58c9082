"""Checkpoints: round trip with tied weights, atomic saves under a simulated kill, and corrupt-file errors."""
import json
import os

import pytest
import torch

import minigpt.checkpoint as ckpt
from minigpt import GPT, GPTConfig
from minigpt.checkpoint import CheckpointError, load_model, load_train_state, read_train_state, save_checkpoint
from minigpt.optim import make_optimizer
from tokenizer import Tokenizer


TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)


def make_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**shape, **kw}))


def config_of(model):
    return {"model": model.config.to_dict(), "train": {}, "step": 0}


def logits(model):
    idx = torch.arange(12).view(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_round_trip_keeps_weights_and_ties_head(tmp_path, tok):
    model = make_model(tok)
    save_checkpoint(tmp_path, model, tok, config_of(model))
    loaded, loaded_tok, config = load_model(tmp_path)
    assert loaded.head.weight is loaded.wte.weight  # re-tied, not two copies
    assert torch.equal(logits(loaded), logits(model))
    assert loaded_tok.checksum == tok.checksum
    assert config["format"] == ckpt.FORMAT and config["version"] == ckpt.VERSION
    from safetensors import safe_open
    with safe_open(str(tmp_path / ckpt.MODEL_FILE), "pt") as f:  # the shared matrix is stored once
        assert sum(k.endswith("wte.weight") or k.endswith("head.weight") for k in f.keys()) == 1


def test_untied_model_round_trip(tmp_path, tok):
    model = make_model(tok, tie_weights=False)
    save_checkpoint(tmp_path, model, tok, config_of(model))
    loaded, _, _ = load_model(tmp_path)
    assert loaded.head.weight is not loaded.wte.weight
    assert torch.equal(logits(loaded), logits(model))


def test_train_state_round_trip(tmp_path, tok):
    model = make_model(tok)
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    for _ in range(2):
        model(torch.randint(0, tok.vocab_size, (2, 8)), torch.randint(0, tok.vocab_size, (2, 8)))[1].backward()
        opt.step()
        opt.zero_grad()
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path, model, tok, config_of(model), opt, {"step": 2}, {"rng.0.torch": rng})
    model2 = make_model(tok, seed=1)
    opt2 = make_optimizer(model2, 1.0, 0.0, (0.5, 0.5), "cpu")
    load_train_state(tmp_path, model2, opt2)
    state, tensors = read_train_state(tmp_path)
    assert state["step"] == 2 and torch.equal(tensors["rng.0.torch"], rng) and not any(
        k.startswith("optimizer.") for k in tensors)
    assert torch.equal(logits(model2), logits(model))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in b["param_groups"]]
    for i, slots in a["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, b["state"][i][key])


def test_rng_state_round_trip():
    import random

    import numpy as np
    as_json, tensors = ckpt.rng_state()
    as_json = json.loads(json.dumps(as_json))  # it must survive JSON
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(as_json, tensors)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


class Killed(Exception):
    pass


def _kill_after(monkeypatch, module_attr, calls):
    """Make the `calls`-th call of os.replace / os.link inside the checkpoint module raise, like a kill."""
    real = getattr(os, module_attr)
    count = {"n": 0}

    def fake(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.os, module_attr, fake)


@pytest.mark.parametrize("calls", range(8))
def test_kill_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, tok, monkeypatch, calls):
    old = make_model(tok, seed=0)
    opt = make_optimizer(old, 1e-3, 0.1, (0.9, 0.95), "cpu")
    save_checkpoint(tmp_path, old, tok, config_of(old), opt, {"step": 1})
    new = make_model(tok, seed=1)
    _kill_after(monkeypatch, "replace", calls)  # 7 replaces per save: backup, 6 files (manifest last)
    try:
        save_checkpoint(tmp_path, new, tok, config_of(new), opt, {"step": 2})
    except Killed:
        pass
    monkeypatch.undo()
    loaded, _, _ = load_model(tmp_path)
    got = logits(loaded)
    assert torch.equal(got, logits(old)) or (calls >= 7 and torch.equal(got, logits(new)))
    load_train_state(tmp_path, make_model(tok, seed=3), opt)
    assert read_train_state(tmp_path)[0]["step"] == (2 if torch.equal(got, logits(new)) else 1)
    # and the next save (the run continuing) repairs the folder
    save_checkpoint(tmp_path, new, tok, config_of(new), opt, {"step": 3})
    assert torch.equal(logits(load_model(tmp_path)[0]), logits(new))
    assert not (tmp_path / ckpt.BACKUP_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming")]


def test_failure_while_writing_new_files_touches_nothing(tmp_path, tok, monkeypatch):
    old = make_model(tok, seed=0)
    save_checkpoint(tmp_path, old, tok, config_of(old))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def broken_save(*a, **k):
        raise Killed

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    new = make_model(tok, seed=1)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, new, tok, config_of(new), make_optimizer(new, 1e-3, 0.1, (0.9, 0.95), "cpu"), {})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


@pytest.fixture
def saved(tmp_path, tok):
    model = make_model(tok)
    save_checkpoint(tmp_path, model, tok, config_of(model))
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.TOKENIZER_FILE, ckpt.MANIFEST_FILE])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(saved)


def test_truncated_safetensors(saved):
    path = saved / ckpt.MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(saved)


def test_garbage_json(saved):
    (saved / ckpt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)


def _rewrite_with_valid_manifest(folder):
    """Edit files *and* re-sign them, as a careless hand edit with a fixed manifest would."""
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = ckpt._file_entry(folder / name)
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_garbage_config_with_valid_manifest(saved):
    (saved / ckpt.CONFIG_FILE).write_text("[1, 2")
    _rewrite_with_valid_manifest(saved)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)


def test_weights_not_matching_config(saved):
    config = json.loads((saved / ckpt.CONFIG_FILE).read_text())
    config["model"]["n_embd"] = 64
    (saved / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    _rewrite_with_valid_manifest(saved)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model(saved)


def test_tokenizer_with_more_tokens_than_the_embedding_is_refused(tmp_path, tok):
    small = Tokenizer.train(TEXT, vocab_size=280, progress=False)
    model = make_model(small)
    save_checkpoint(tmp_path, model, tok, config_of(model))
    with pytest.raises(CheckpointError, match="300 tokens but the model .* has only 280"):
        load_model(tmp_path)


def test_tokenizer_with_fewer_tokens_than_the_embedding_loads(tmp_path, tok):
    """A padded vocabulary (GPT-2's 50257 ids in 50304 rows, say) is common: the extra rows are never produced."""
    small = Tokenizer.train(TEXT, vocab_size=280, progress=False)
    model = make_model(tok)
    save_checkpoint(tmp_path, model, small, config_of(model))
    loaded, loaded_tok, _ = load_model(tmp_path)
    assert loaded.config.vocab_size == 300 and loaded_tok.vocab_size == 280


def test_weights_only_checkpoint_cannot_be_resumed(saved, tok):
    model = make_model(tok)
    with pytest.raises(CheckpointError, match="train_state"):
        load_train_state(saved, model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu"))
