"""The resume contract (minigpt/train_state.py): what a resume takes back, including from older checkpoints, from
another working folder and without the corpus, and in which precision."""
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_cli
from data.errors import DataError
from data.loader import BatchLoader
from minigpt import train_state
from minigpt.checkpoint import read_config
from minigpt.errors import CheckpointError, ConfigError
from minigpt.train_state import VERSION, TrainState
from minigpt.trainer import train

from helpers import overflow_at, records, tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder / "corpus.txt"), folder / "cache"


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def state_json(out: Path) -> dict:
    return json.loads((out / "train_state.json").read_text())


def as_version_1(monkeypatch) -> None:
    """Make the trainer write train_state.json as version 1 did: no version, best_step, precision, prepared_data."""
    real = TrainState.to_files

    def to_files(self):
        values, tensors = real(self)
        return {k: v for k, v in values.items() if k not in ("version", "best_step", "precision", "prepared_data")}, \
            tensors

    monkeypatch.setattr(TrainState, "to_files", to_files)


# ------------------------------------------------------------------------------------------------ versions
def test_the_state_is_versioned_and_a_newer_version_is_refused(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    values = state_json(out)
    assert values["version"] == VERSION == 2
    assert {"best_step", "precision", "prepared_data"} <= set(values)
    with pytest.raises(CheckpointError, match="version 3.*update minigpt"):
        TrainState.from_files({**values, "version": 3}, {}, {})


def test_an_unversioned_state_is_read_as_version_1_and_migrated():
    v1 = {"step": 40, "best_val_loss": 2.5, "world_size": 1, "grad_accum": 1, "loaders": [{}], "rng": [{}],
          "grad_scaler": {"scale": 1024.0}, "optimizer": {}}
    state = TrainState.from_files(v1, {}, {"dtype": "auto"})
    assert (state.version, state.step, state.best_step, state.prepared_data) == (VERSION, 40, None, None)
    assert state.precision == "float16"  # auto with a loss scaler saved: it ran in float16
    assert (state.elapsed_s, state.skipped_steps, state.data_seed, state.planned_iters) == (0.0, 0, None, None)
    assert TrainState.from_files({**v1, "grad_scaler": {}}, {}, {"dtype": "auto"}).precision is None  # unknown
    assert TrainState.from_files(v1, {}, {"dtype": "bfloat16"}).precision == "bfloat16"


def test_a_version_1_checkpoint_resumes_exactly(tmp_path, corpus, monkeypatch):
    """A checkpoint written in the old format (best_step taken from best/) continues bit-exactly, also when its
    corpus is gone (then from the only prepared-data folder its tokenizer made)."""
    data = tmp_path / "texts" / "corpus.txt"
    data.parent.mkdir()
    shutil.copy(corpus[0], data)
    straight = train(tiny_config(data, tmp_path / "cache-a", tmp_path / "a", max_iters=12, eval_interval=4,
                                 lr_decay_iters=12))
    as_version_1(monkeypatch)
    train(tiny_config(data, None, tmp_path / "b", max_iters=8, eval_interval=4, lr_decay_iters=12, data_dir=None))
    monkeypatch.undo()
    assert "version" not in state_json(tmp_path / "b")
    migrated = TrainState.read(tmp_path / "b")
    assert migrated.best_step == read_config(tmp_path / "b" / "best")["step"] and migrated.prepared_data is None
    data.unlink()
    resumed = train(tiny_config(data, None, tmp_path / "b", max_iters=12, eval_interval=4, lr_decay_iters=12,
                                resume=True, data_dir=None))
    assert same_weights(straight, resumed)
    assert state_json(resumed)["version"] == VERSION


# ------------------------------------------------------------------------------------------------ paths
def test_resume_from_another_working_folder_and_without_the_corpus(tmp_path, corpus, monkeypatch, capsys):
    """Relative --data and --out-dir: config.json records them resolved; a resume from elsewhere finds the corpus,
    and once the corpus is gone it trains on the tokens prepared from it (saying so), as a straight run does."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "texts").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(corpus[0], work / "texts" / "corpus.txt")
    straight = train(tiny_config(work / "texts" / "corpus.txt", tmp_path / "cache", tmp_path / "straight",
                                 max_iters=12, eval_interval=4, lr_decay_iters=12))
    monkeypatch.chdir(work)
    flags = ["--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
             "--batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-iters", "3", "--eval-iters", "4",
             "--log-interval", "1", "--no-progress", "--device", "cpu", "--eval-interval", "4", "--lr-decay-iters", "12"]
    train(train_cli.make_config(["--data", "texts/corpus.txt", "--out-dir", "run", "--max-iters", "4", *flags]))
    saved = read_config(work / "run")["train"]
    assert saved["data"] == str(work / "texts" / "corpus.txt") and saved["out_dir"] == str(work / "run")

    monkeypatch.chdir(elsewhere)
    run = str(work / "run")
    train(train_cli.make_config(["--resume", "--out-dir", run, "--max-iters", "8", "--no-progress"]))
    assert read_config(run)["step"] == 8
    (work / "texts" / "corpus.txt").unlink()
    capsys.readouterr()
    train(train_cli.make_config(["--resume", "--out-dir", run, "--max-iters", "12", "--no-progress"]))
    said = capsys.readouterr().out
    assert re.search(r"note: the corpus cannot be read \(no such file or folder: .*corpus.txt\); resuming on "
                     r"the tokens prepared from it in .*run/data/corpus-", said), said
    assert same_weights(straight, Path(run))
    assert [r["loss"] for r in records(straight, "train")] == [r["loss"] for r in records(Path(run), "train")]


def test_a_resume_on_a_changed_corpus_says_what_changed(tmp_path, corpus, capsys):
    """The corpus grew after the checkpoint: the resume goes on with the new tokens (as nanoGPT's does with
    whatever train.bin holds), and says so: its batches and its validation split are new. A resume on the same
    corpus, also one whose tokens are prepared again in a new cache, says nothing."""
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus[0], data)
    out = train(tiny_config(data, tmp_path / "cache", tmp_path / "run", max_iters=4, eval_interval=2))
    train(tiny_config(data, tmp_path / "other-cache", out, max_iters=6, eval_interval=2, resume=True))
    assert "changed since the checkpoint" not in capsys.readouterr().out
    old_val = len(TrainState.read(out).prepared_tokens(read_config(out)["tokenizer_checksum"], out).val_tokens)
    with open(data, "a", encoding="utf-8") as f:
        f.write(write_corpus(tmp_path / "more.txt", sentences=500, seed=1).read_text())
    train(tiny_config(data, tmp_path / "other-cache", out, max_iters=8, eval_interval=2, resume=True))
    said = capsys.readouterr().out
    note = re.search(r"note: the corpus or the data settings changed since the checkpoint, which trained on "
                     r"\S+/other-cache/corpus-\S+ \(([\d,]+) train \+ ([\d,]+) val tokens\); this run goes on with "
                     r"the tokens prepared now in \S+/other-cache/corpus-\S+ \(([\d,]+) \+ ([\d,]+)\), and its "
                     r"validation split is new: losses from here are not comparable with the earlier evaluations", said)
    assert note, said
    before_train, before_val, now_train, now_val = (int(n.replace(",", "")) for n in note.groups())
    assert before_val == old_val and now_train > before_train and now_val > before_val
    assert read_config(out)["step"] == 8


def test_without_its_corpus_or_prepared_tokens_a_resume_says_what_is_missing(tmp_path, corpus):
    data = tmp_path / "corpus.txt"
    shutil.copy(corpus[0], data)
    out = train(tiny_config(data, tmp_path / "cache", tmp_path / "run", max_iters=4, eval_interval=4))
    data.unlink()
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(DataError, match="no such file or folder"):
        train(tiny_config(data, tmp_path / "cache", out, max_iters=8, resume=True))


def test_a_resume_with_another_data_layout_says_how_a_steps_size_changes(tmp_path, corpus, capsys):
    """2 micro-batches a step resumed with 1: the batches cannot be replayed, and each step is half the size."""
    out = tmp_path / "run"
    cfg = tiny_config(*corpus, out, max_iters=2, eval_interval=2, grad_accum=2)
    train(cfg)
    capsys.readouterr()
    train(tiny_config(*corpus, out, max_iters=4, eval_interval=2, grad_accum=1, resume=True))
    tokens = cfg.batch_size * cfg.model.block_size
    assert ("note: the checkpoint was written by 1 process(es) × grad_accum 2, this run is 1 × 1; data order "
            f"restarts from a new seed, and a step takes 0.5x the sequences it took ({tokens:,} tokens now; "
            "--total-batch-tokens keeps a step's size on any number of processes)") in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ precision
def test_resume_continues_in_the_checkpoints_precision(tmp_path, corpus):
    """A float16 run resumed without --dtype goes on in float16 with its loss scaler, as a straight run does."""
    straight = train(tiny_config(*corpus, tmp_path / "a", max_iters=8, eval_interval=4, dtype="float16"))
    train(tiny_config(*corpus, tmp_path / "b", max_iters=4, eval_interval=4, dtype="float16"))
    resumed = train(tiny_config(*corpus, tmp_path / "b", max_iters=8, eval_interval=4, resume=True))  # dtype auto
    assert all("loss_scale" in r for r in records(resumed, "train"))
    assert state_json(resumed)["precision"] == "float16"
    assert same_weights(straight, resumed)


def test_a_precision_the_device_cannot_use_is_replaced_saying_so_and_the_scaler_is_kept(tmp_path, corpus,
                                                                                        monkeypatch, capsys):
    out = tmp_path / "run"
    overflow_at(monkeypatch, 2)  # the scale halves: 32768
    train(tiny_config(*corpus, out, max_iters=4, eval_interval=4, dtype="float16"))
    monkeypatch.undo()
    scaler = state_json(out)["grad_scaler"]
    assert scaler["scale"] == 32768.0

    real = train_state.autocast_dtype

    def no_float16(dtype, device):
        if dtype == "float16":
            raise ConfigError("--dtype float16 cannot be used here")
        return real(dtype, device)

    monkeypatch.setattr(train_state, "autocast_dtype", no_float16)
    capsys.readouterr()
    train(tiny_config(*corpus, out, max_iters=8, eval_interval=4, resume=True))
    monkeypatch.undo()
    said = capsys.readouterr().out
    assert "note: the checkpoint was trained in float16; this run continues in float32 (cpu cannot autocast to " \
           "float16); its float16 loss scaler is kept for a later float16 resume" in said
    assert "loss_scale" not in records(out, "train")[-1]
    assert state_json(out)["precision"] == "float32" and state_json(out)["grad_scaler"] == scaler

    train(tiny_config(*corpus, out, max_iters=10, eval_interval=5, resume=True, dtype="float16"))
    assert records(out, "train")[-1]["loss_scale"] == 32768.0  # the kept scale, not a fresh 65536


def test_a_given_dtype_that_differs_from_the_checkpoints_is_noted(tmp_path, corpus, capsys):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4, dtype="float16"))
    capsys.readouterr()
    train(tiny_config(*corpus, out, max_iters=6, eval_interval=6, resume=True, dtype="float32"))
    assert "note: the checkpoint was trained in float16; this run continues in float32 (as --dtype says)" in \
        capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ messages
def test_the_end_of_a_resumed_run_gives_the_time_since_resuming_and_in_all(tmp_path, corpus, monkeypatch, capsys):
    real = BatchLoader.next_batch

    def slow_batch(self):  # a first part that surely takes longer than the resumed part
        time.sleep(0.5)
        return real(self)

    monkeypatch.setattr(BatchLoader, "next_batch", slow_batch)
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=4, eval_interval=4))
    monkeypatch.undo()
    first_part = state_json(out)["elapsed_s"]
    assert first_part >= 2.0
    capsys.readouterr()
    train(tiny_config(*corpus, out, max_iters=6, eval_interval=6, resume=True))
    since, whole = map(float, re.search(r"done: step 6, ([0-9.]+)s since resuming at step 4 \(([0-9.]+)s in all\)",
                                        capsys.readouterr().out).groups())
    assert whole - since >= first_part - 0.1


def test_resume_while_the_first_run_has_not_saved_says_another_run_is_writing(tmp_path):
    from data.lock import file_lock

    out = tmp_path / "starting"
    out.mkdir()
    with file_lock(out / ".lock", wait=False):  # as a run that is still preparing its data holds it
        with pytest.raises(ConfigError, match=r"another run \(pid \d+ on .*\) is writing into .*starting and has "
                                              r"not saved a checkpoint yet"):
            train_cli.make_config(["--resume", "--out-dir", str(out)])
    with pytest.raises(CheckpointError, match="manifest.json is missing: no checkpoint was saved in .*starting "
                                              ".* start the run again without --resume"):  # no run there, nor any save
        train_cli.make_config(["--resume", "--out-dir", str(out)])


def test_the_state_records_the_best_step_and_the_prepared_tokens(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=2, eval_interval=2))
    state = TrainState.read(out)
    assert state.best_step == 2 and math.isfinite(state.best_val_loss)
    assert state.prepared_data == str(next((corpus[1]).glob("corpus-*")).resolve())


def test_optimizer_settings_given_on_resume_apply(tmp_path, corpus):
    """The optimizer's parameter groups in the checkpoint carried the first run's weight decay and betas, and
    loading them undid the new values, while config.json recorded the new ones."""
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=2, eval_interval=2))
    train(tiny_config(*corpus, out, max_iters=3, eval_interval=3, resume=True, weight_decay=0.5, beta1=0.8,
                      beta2=0.9))
    groups = state_json(out)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.8, 0.9)), (0.0, (0.8, 0.9))]
    assert read_config(out)["train"]["weight_decay"] == 0.5
