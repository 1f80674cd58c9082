"""The training loop in-process: it learns, resumes bit-exactly, stops cleanly, and refuses to clobber."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.loader import BatchLoader
from minigpt import GPT
from minigpt.checkpoint import load_model, read_config
from minigpt.config import TrainConfig
from minigpt.errors import CheckpointError, ConfigError
from minigpt.optim import lr_at
from minigpt.trainer import TrainingError, resume_command, train

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
    handler = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a shell's background job
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*corpus, tmp_path / "b", shape, max_iters=20))
    monkeypatch.undo()
    assert read_config(tmp_path / "b")["step"] == 7  # the step during which Ctrl-C came was finished first
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
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


def test_a_cuda_device_is_made_current_before_training(tmp_path, corpus, monkeypatch):
    """train() makes the GPU it resolved the current one. (This once broke on CUDA alone: an import inside train()
    made `torch` a local name there.) With no GPU here, the device is made to resolve to cuda, and set_device
    stops the run when it is reached."""
    import minigpt.trainer as trainer

    class Reached(Exception):
        pass

    def set_device(device):
        raise Reached(device)

    monkeypatch.setattr(trainer, "resolve_device", lambda name, local_rank: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Reached):
        train(tiny_config(*corpus, tmp_path / "out"))


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


def test_a_second_run_into_the_same_out_dir_is_refused_while_the_first_runs(tmp_path, corpus, monkeypatch):
    """Two runs writing one folder would interleave metrics and clobber each other's files: the second is refused,
    naming the folder and the process of the first, and the first goes on untouched."""
    out = tmp_path / "shared"
    real, refused = BatchLoader.next_batch, []

    def next_batch(self):
        if self.batches == 3 and not refused:
            refused.append("the second run started")  # and must not get here again
            with pytest.raises(ConfigError) as second:
                train(tiny_config(*corpus, out, max_iters=4, overwrite=True))
            refused[0] = str(second.value)
        return real(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)
    train(tiny_config(*corpus, out, max_iters=8, eval_interval=4))
    monkeypatch.undo()
    assert len(refused) == 1 and str(out) in refused[0] and f"pid {os.getpid()}" in refused[0], refused
    assert [r["step"] for r in records(out, "train")] == list(range(1, 9))
    assert read_config(out)["step"] == 8
    assert not (out / ".lock").exists()  # released: the next run may start
    train(tiny_config(*corpus, out, max_iters=10, eval_interval=5, resume=True))
    assert read_config(out)["step"] == 10


def test_elapsed_time_keeps_counting_across_resume(tmp_path, corpus, monkeypatch):
    real = BatchLoader.next_batch

    def slow_batch(self):  # a first part that surely takes longer than the resumed part needs to start
        time.sleep(0.1)
        return real(self)

    monkeypatch.setattr(BatchLoader, "next_batch", slow_batch)
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    monkeypatch.undo()
    first_part = [r["elapsed_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert first_part[-1] >= 0.4
    train(tiny_config(*corpus, out, max_iters=8, eval_interval=4, resume=True))
    elapsed = [r["elapsed_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert elapsed[:len(first_part)] == first_part and len(elapsed) > len(first_part)
    assert elapsed == sorted(elapsed), elapsed
    assert elapsed[len(first_part)] > first_part[-1]


def test_min_lr_follows_lr_unless_given(tmp_path, corpus):
    """The cosine ends at lr / 10 by default, so a small --lr is valid without a --min-lr; one given is checked
    against --lr, naming the flag."""
    assert TrainConfig(lr=5e-5).final_lr == pytest.approx(5e-6)
    assert TrainConfig(lr=5e-5, min_lr=1e-6).final_lr == 1e-6
    with pytest.raises(ConfigError, match="--min-lr 0.001 must be between 0 and --lr 5e-05"):
        TrainConfig(lr=5e-5, min_lr=1e-3)
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=10, eval_interval=10, lr=5e-5, min_lr=None,
                            warmup_iters=2))
    expected = [lr_at(step, 5e-5, 5e-6, 2, 10) for step in range(10)]
    assert [r["lr"] for r in records(out, "train")] == pytest.approx(expected, rel=1e-9)
    assert read_config(out)["train"]["min_lr"] is None  # a resume with another --lr follows it too


def test_resume_checks_the_model_before_preparing_data(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    missing = tmp_path / "no-such-corpus.txt"  # preparing it would fail: the model check must come first
    with pytest.raises(CheckpointError, match="different model.*n_layer=1 .asked: 2"):
        train(tiny_config(missing, corpus[1], out, {"n_layer": 2}, max_iters=8, resume=True))


def test_resume_with_nothing_left_to_do_says_so(tmp_path, corpus, capsys):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    train(tiny_config(*corpus, out, max_iters=4, resume=True))
    said = capsys.readouterr().out
    assert "already at step 4 of --max-iters 4: nothing to do" in said
    assert "preparing" not in said and "reusing" not in said  # it stopped before the data
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_warmup_longer_than_the_run_is_reported(tmp_path, corpus, capsys):
    train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4, warmup_iters=10))
    assert "--warmup-iters 10 is longer than the run (--max-iters 4)" in capsys.readouterr().out


def test_path_settings_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(out_dir="~/run", data_dir="~/cache", tokenizer="~/tok.json", data="~/corpus.txt")
    assert (cfg.out_dir, cfg.data_dir, cfg.tokenizer, cfg.data) == tuple(
        str(tmp_path / name) for name in ("run", "cache", "tok.json", "corpus.txt"))


def test_resume_command_quotes_the_folder_and_names_torchrun(monkeypatch):
    folder = Path("/tmp/my runs/a")
    assert resume_command(folder) == "python train.py --resume --out-dir '/tmp/my runs/a'"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(folder) == "torchrun --nnodes=2 --nproc_per_node=4 train.py --resume --out-dir '/tmp/my runs/a'"
