"""The training loop in-process: it learns, resumes bit-exactly, stops cleanly, and refuses to clobber."""
import signal

import pytest
import torch
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.checkpoint import load_model, read_config
from minigpt.errors import CheckpointError, ConfigError
from minigpt.trainer import TrainingError, train

from helpers import interrupt_at, records, tiny_config, untimed, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder / "corpus.txt"), folder / "cache"


def test_short_run_lowers_validation_loss(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "out", max_iters=60, eval_interval=20))
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[-1]["val_bits_per_byte"] < evals[0]["val_bits_per_byte"]
    assert evals[0]["val_perplexity"] == pytest.approx(torch.tensor(evals[0]["val_loss"]).exp().item(), rel=1e-5)
    steps = records(out, "train")
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["tokens_per_sec"] > 0 for r in steps)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tok, config = load_model(out)
    assert config["step"] == 60 and config["train"]["max_iters"] == 60
    best, _, best_config = load_model(out / "best")
    assert best_config["step"] == min(evals[1:], key=lambda e: e["val_loss"])["step"]  # step 0 is not saved


def test_ctrl_c_saves_and_resume_is_bit_exact(tmp_path, corpus, monkeypatch):
    shape = {"dropout": 0.1}  # dropout draws from torch's RNG, so its state must be restored too
    straight = train(tiny_config(*corpus, tmp_path / "a", shape, max_iters=20))

    interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*corpus, tmp_path / "b", shape, max_iters=20))
    monkeypatch.undo()
    assert read_config(tmp_path / "b")["step"] == 7  # the step during which Ctrl-C came was finished first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = train(tiny_config(*corpus, tmp_path / "b", shape, max_iters=20, resume=True))

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(straight, "train")] == [r["loss"] for r in records(resumed, "train")]
    assert untimed(records(straight, "eval")) == untimed(records(resumed, "eval"))


def test_resume_can_extend_a_finished_run(tmp_path, corpus):
    """N steps with the schedule of 2N (lr_decay_iters), then resume to 2N: the same as 2N at once."""
    straight = train(tiny_config(*corpus, tmp_path / "a", max_iters=16, eval_interval=8))
    train(tiny_config(*corpus, tmp_path / "b", max_iters=8, lr_decay_iters=16, eval_interval=8))
    resumed = train(tiny_config(*corpus, tmp_path / "b", max_iters=16, lr_decay_iters=16, eval_interval=8,
                                resume=True))
    assert [r["loss"] for r in records(straight, "train")] == [r["loss"] for r in records(resumed, "train")]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real_forward, calls = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 8:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(TrainingError, match="non-finite.*step 8"):
        train(tiny_config(*corpus, tmp_path / "out", eval_interval=5))
    monkeypatch.undo()
    model, _, config = load_model(tmp_path / "out")
    assert config["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_existing_checkpoint_is_not_clobbered(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "out", max_iters=4, eval_interval=4))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(tiny_config(*corpus, out, max_iters=4))
    with pytest.raises(CheckpointError, match="different model.*n_layer"):
        train(tiny_config(*corpus, out, {"n_layer": 2}, max_iters=8, resume=True))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    train(tiny_config(*corpus, out, max_iters=2, eval_interval=2, overwrite=True))
    assert read_config(out)["step"] == 2


def test_grad_accumulation_matches_a_bigger_batch_in_expectation(tmp_path, corpus):
    """grad_accum 2 x batch 4 and grad_accum 1 x batch 8 both train; loss curves are close (not equal: different
    windows are drawn)."""
    a = train(tiny_config(*corpus, tmp_path / "a", batch_size=4, grad_accum=2, max_iters=30, eval_interval=30))
    b = train(tiny_config(*corpus, tmp_path / "b", batch_size=8, max_iters=30, eval_interval=30))
    va, vb = records(a, "eval")[-1]["val_loss"], records(b, "eval")[-1]["val_loss"]
    assert abs(va - vb) < 0.15 * vb


def test_resume_twice_after_a_change_of_grad_accum(tmp_path, corpus):
    """A resume with another data layout draws batches from a new seed; a second resume must rebuild those."""
    out = tmp_path / "run"
    train(tiny_config(*corpus, out, max_iters=4, eval_interval=4))
    train(tiny_config(*corpus, out, max_iters=8, eval_interval=4, grad_accum=2, resume=True))
    train(tiny_config(*corpus, out, max_iters=12, eval_interval=4, grad_accum=2, resume=True))
    assert read_config(out)["step"] == 12
    assert [r["step"] for r in records(out, "eval")] == [0, 4, 8, 12]


def test_a_killed_save_leaves_no_leftovers_after_the_next(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    (out / ".incoming-killed").mkdir()
    (out / ".incoming-killed" / "model.safetensors").write_bytes(b"half")
    train(tiny_config(*corpus, out, max_iters=8, eval_interval=4, resume=True))
    assert not list(out.glob(".incoming-*"))
