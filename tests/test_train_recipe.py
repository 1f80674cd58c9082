"""The rest of the training recipe, end to end on tiny runs: early stopping, a time budget, label smoothing, and
float16 with loss scaling (run on this CPU: torch autocasts to float16 here too)."""
import contextlib
import io
import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

from minigpt.checkpoint import read_config
from minigpt.errors import ConfigError
from minigpt.optim import lr_at
from minigpt.stopping import CORRECT_AT, MEASURE_STEPS, SKIP_STEPS
from minigpt import trainer
from minigpt.trainer import train

from helpers import interrupt_at, overflow_at, records, tiny_config, untimed, write_corpus


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The loss plot is most of a tiny run's time, and none of what is tested here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "plot_losses", lambda records, path: None)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder / "corpus.txt"), folder / "cache"


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Byte tokens; training lines "abab..." and "cdcd...", validation lines (the tail) "acac...". The model first
    learns which bytes are common, which helps on both; then that "a" is followed by "b", which hurts on the
    validation text more and more: its validation loss falls, then rises."""
    folder = tmp_path_factory.mktemp("shifted")
    (folder / "shifted.txt").write_text("\n".join(["ab" * 30, "cd" * 30] * 40 + ["ac" * 30] * 10) + "\n")
    return folder / "shifted.txt", folder / "cache"


# Byte tokens (no merges); a constant rate, so that a run to fewer steps has the same rate at every step.
STOPPING = dict(vocab_size=257, val_fraction=0.1, eval_interval=5, eval_iters=2, patience=3, lr_schedule="constant")


def weights(out):
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_state(out):
    return json.loads((out / "train_state.json").read_text())


# ------------------------------------------------------------------------------------------- early stopping
@pytest.fixture(scope="module")
def stopped(tmp_path_factory, shifted):
    """The run on the shifted corpus, with its printed output."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = train(tiny_config(*shifted, tmp_path_factory.mktemp("stopped") / "out", max_iters=200, **STOPPING))
    return out, printed.getvalue()


def test_early_stopping_stops_when_validation_stops_improving(stopped):
    out, printed = stopped
    evals = [e for e in records(out, "eval") if e["step"] > 0]
    best = min(evals, key=lambda e: e["val_loss"])
    assert 5 < best["step"] < 100 and evals[0]["val_loss"] > best["val_loss"]  # it improved, then it did not
    assert [e["step"] for e in evals if e["step"] > best["step"]] == [best["step"] + 5 * k for k in (1, 2, 3)]
    (stop,) = records(out, "stop")
    assert stop == {**stop, "step": best["step"] + 15, "reason": "early_stopping", "patience": 3,
                    "best_step": best["step"], "best_val_loss": best["val_loss"]}
    assert read_config(out)["step"] == stop["step"]
    assert read_config(out / "best")["step"] == best["step"]  # best/ is the one to use
    assert f"early stopping at step {stop['step']}" in printed and str(out / "best") in printed


def test_early_stopping_lets_an_improving_run_finish(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "out", max_iters=40, eval_interval=10, patience=1))
    val = [e["val_loss"] for e in records(out, "eval")]
    assert all(b < a for a, b in zip(val, val[1:]))  # it did keep improving...
    assert read_config(out)["step"] == 40 and not records(out, "stop")  # ...so it ran to the end
    assert train_state(out)["early_stopping"]["bad_evals"] == 0


def test_early_stopping_counter_survives_resume(tmp_path, shifted, stopped):
    straight = stopped[0]
    best_step = records(straight, "stop")[0]["best_step"]
    part = train(tiny_config(*shifted, tmp_path / "b", max_iters=best_step + 5, **STOPPING))
    assert train_state(part)["early_stopping"]["bad_evals"] == 1  # its last evaluation was no improvement
    resumed = train(tiny_config(*shifted, tmp_path / "b", max_iters=200, resume=True, **STOPPING))
    assert read_config(resumed)["step"] == best_step + 15 == read_config(straight)["step"]
    assert untimed(records(resumed, "stop")) == untimed(records(straight, "stop"))
    # An early-stopped run resumed as it was does not train on; with a larger patience it does.
    again = train(tiny_config(*shifted, tmp_path / "b", max_iters=200, resume=True, **STOPPING))
    assert read_config(again)["step"] == best_step + 15
    more = train(tiny_config(*shifted, tmp_path / "b", max_iters=200, resume=True,
                             **{**STOPPING, "patience": 4}))
    assert read_config(more)["step"] == best_step + 20


# ------------------------------------------------------------------------------------------- time budget
def test_time_budget_fixes_the_steps_runs_the_whole_schedule_and_resumes_exactly(tmp_path, corpus, monkeypatch,
                                                                                 capsys):
    """A budget run, interrupted after its plan and resumed as train.py would (max_iters from the checkpoint),
    trains exactly as a plain run of the planned length: the schedule spans the planned steps, from the start."""
    plan_step = SKIP_STEPS + MEASURE_STEPS
    settings = dict(warmup_iters=plan_step, eval_interval=1000, eval_iters=2, log_interval=1)  # timed in warmup
    interrupt_at(monkeypatch, plan_step)  # stops at step plan_step + 1; the plan allows at least that many
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*corpus, tmp_path / "budget", max_time="2s", **settings))
    monkeypatch.undo()
    saved = read_config(tmp_path / "budget")
    steps = saved["train"]["max_iters"]
    (plan,) = records(tmp_path / "budget", "plan")
    assert saved["step"] == plan_step + 1 and plan["step"] == plan_step and plan["max_iters"] == steps > plan_step
    assert train_state(tmp_path / "budget")["planned_iters"] == steps and saved["train"]["max_time"] == "2s"
    assert plan["step_s"] * (steps - plan_step - 1) < 2  # the planned steps fit in the budget
    capsys.readouterr()

    resumed = train(tiny_config(*corpus, tmp_path / "budget", max_time="2s", resume=True,
                                **{**settings, "max_iters": steps}))
    assert f"done: step {steps}" in capsys.readouterr().out
    plain = train(tiny_config(*corpus, tmp_path / "plain", max_iters=steps, **settings))
    assert_same_weights(resumed, plain)
    lrs = [r["lr"] for r in records(resumed, "train")]
    assert lrs == [r["lr"] for r in records(plain, "train")]
    assert lrs[-1] == pytest.approx(lr_at(steps - 1, 3e-3, 3e-4, plan_step, steps))  # annealed to min_lr
    assert not records(resumed, "plan")[1:]  # planned once, not again on resume


def test_time_budget_summary_says_how_long_against_the_budget(tmp_path, corpus, capsys):
    out = train(tiny_config(*corpus, tmp_path / "out", max_time="1s", warmup_iters=5, eval_interval=1000,
                            eval_iters=1))
    (plan,) = records(out, "plan")
    corrections = records(out, "replan")  # a quarter and half-way through, with the step times measured since
    assert [r["step"] for r in corrections] == [SKIP_STEPS + MEASURE_STEPS + round(f * (plan["max_iters"] - plan["step"]))
                                                for f in CORRECT_AT]
    final = corrections[-1]["max_iters"]
    assert read_config(out)["step"] == final > SKIP_STEPS + MEASURE_STEPS
    printed = capsys.readouterr().out
    assert f"time budget 1s: {plan['step_s'] * 1e3:.1f} ms per step" in printed
    assert re.search(rf"done: {final} steps in [0-9.]+s, of which training, evaluations and saves "
                     rf"[0-9.]+s: [0-9.]+% of the 1s budget", printed)


# ------------------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_changes_the_training_loss_but_not_the_evaluation(tmp_path, corpus):
    plain = train(tiny_config(*corpus, tmp_path / "plain", max_iters=2, eval_interval=2))
    smooth = train(tiny_config(*corpus, tmp_path / "smooth", max_iters=2, eval_interval=2, label_smoothing=0.1))
    # Same initial weights and batches: the step-0 evaluation is the same plain NLL; the training loss is not.
    assert records(plain, "eval")[0]["val_loss"] == records(smooth, "eval")[0]["val_loss"]
    assert records(plain, "train")[0]["loss"] != records(smooth, "train")[0]["loss"]
    assert read_config(smooth)["train"]["label_smoothing"] == 0.1


# ------------------------------------------------------------------------------------------- float16
def test_float16_logs_the_true_gradient_norm(tmp_path, corpus):
    """The scaled loss is 65536 x larger; unscaling before the norm and the clip gives the float32 numbers."""
    half = train(tiny_config(*corpus, tmp_path / "half", max_iters=6, eval_interval=6, dtype="float16"))
    full = train(tiny_config(*corpus, tmp_path / "full", max_iters=6, eval_interval=6))
    h, f = records(half, "train"), records(full, "train")
    assert h[0]["loss_scale"] == 65536.0 and h[-1]["skipped_steps"] == 0 and "loss_scale" not in f[0]
    for a, b in zip(h, f):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05)
        assert a["loss"] == pytest.approx(b["loss"], rel=0.01)
    assert records(half, "eval")[-1]["val_loss"] == pytest.approx(records(full, "eval")[-1]["val_loss"], rel=0.01)


def test_float16_overflow_skips_the_step_and_halves_the_scale(tmp_path, corpus, monkeypatch):
    settings = dict(eval_interval=100, dtype="float16", lr_decay_iters=20)
    clean = train(tiny_config(*corpus, tmp_path / "clean", max_iters=3, **settings))
    overflow_at(monkeypatch, 4)
    skipped = train(tiny_config(*corpus, tmp_path / "skipped", max_iters=4, **settings))
    assert_same_weights(clean, skipped)  # step 4 changed nothing
    log = records(skipped, "train")
    assert [r["loss_scale"] for r in log] == [65536.0] * 3 + [32768.0]
    assert [r["skipped_steps"] for r in log] == [0, 0, 0, 1] and log[3]["grad_norm"] is None
    state = train_state(skipped)
    assert state["skipped_steps"] == 1 and state["grad_scaler"]["scale"] == 32768.0
    adam_steps = [float(load_file(str(out / "train_state.safetensors"))["optimizer.0.step"]) for out in (clean, skipped)]
    assert adam_steps == [3.0, 3.0]  # AdamW did not count the skipped step either


def test_float16_resume_restores_the_scaler_exactly(tmp_path, corpus, monkeypatch):
    settings = dict(max_iters=12, eval_interval=6, dtype="float16")
    overflow_at(monkeypatch, 3)
    straight = train(tiny_config(*corpus, tmp_path / "a", **settings))
    overflow_at(monkeypatch, 3)
    interrupt_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*corpus, tmp_path / "b", **settings))
    monkeypatch.undo()
    assert train_state(tmp_path / "b")["grad_scaler"]["scale"] == 32768.0  # saved after the overflow
    resumed = train(tiny_config(*corpus, tmp_path / "b", resume=True, **settings))
    assert_same_weights(straight, resumed)
    keys = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps")
    assert [[r[k] for k in keys] for r in records(straight, "train")] == \
        [[r[k] for k in keys] for r in records(resumed, "train")]
    assert train_state(straight)["grad_scaler"] == train_state(resumed)["grad_scaler"]


# ------------------------------------------------------------------------------------------- issue 17's edges
def scripted_val_losses(monkeypatch, losses):
    """Make the evaluations report `losses` as validation losses, one per evaluation (train loss: the same)."""
    evaluate, calls = trainer.evaluate_loss, iter(loss for loss in losses for _ in ("train", "val"))

    def scripted(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        return {**result, "loss": next(calls)}

    monkeypatch.setattr(trainer, "evaluate_loss", scripted)


def test_the_stop_line_names_the_model_in_best(tmp_path, corpus, monkeypatch):
    """With --min-delta the stopper's reference (4.0) is not the best loss: the stop line gives best/'s."""
    scripted_val_losses(monkeypatch, [5.0, 4.0, 3.95, 3.9, 3.85])
    out = train(tiny_config(*corpus, tmp_path / "out", max_iters=20, eval_interval=2, patience=3, min_delta=0.2))
    (stop,) = records(out, "stop")
    assert stop["step"] == 8 and (stop["best_val_loss"], stop["best_step"]) == (3.85, 8)
    assert read_config(out / "best")["step"] == stop["best_step"]


def test_resuming_a_stopped_run_says_why_before_preparing_data(stopped, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(stopped[0], out)
    (stop,) = records(out, "stop")
    train(tiny_config(tmp_path / "gone.txt", tmp_path / "cache", out, max_iters=200, resume=True, **STOPPING))
    said = capsys.readouterr().out
    assert f"the run in {out} stopped early at step {stop['step']}" in said and "nothing to do" in said
    assert str(out / "best") in said and "--patience above 3" in said
    assert "reusing" not in said and "preparing" not in said
    assert trainer.next_step_hint(out).endswith("--patience N (N > 3)")
    assert trainer.next_step_hint(stopped[0].parent / "nowhere").endswith("--max-iters N")


def test_a_new_budget_for_a_finished_run_is_refused(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "out", max_iters=4, eval_interval=4))
    with pytest.raises(ConfigError, match=r"--max-time 10s cannot apply to the run in .*: it is already at step 4 "
                                          r"of --max-iters 4.*give a larger --max-iters"):
        train(tiny_config(*corpus, out, max_iters=4, resume=True, max_time="10s"))


def test_a_budget_too_short_to_measure_is_warned_of_before_training(tmp_path, corpus, monkeypatch, capsys):
    """The step-0 evaluation is made slow: the guess of 22 steps, an evaluation and a save exceeds 1s."""
    evaluate = trainer.evaluate_loss

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_loss", slow)
    train(tiny_config(*corpus, tmp_path / "out", max_time="1s", eval_interval=1000, eval_iters=2, warmup_iters=2))
    said = capsys.readouterr().out
    warning = said.find("warning: --max-time 1s is shorter than the first 22 steps, an evaluation and a save")
    assert 0 <= warning < said.find("time budget 1s: "), said  # before the plan, made after the first steps


def test_a_budget_shortens_a_long_warmup_before_training(tmp_path, corpus, capsys):
    out = train(tiny_config(*corpus, tmp_path / "out", max_time="1s", eval_interval=1000, eval_iters=2,
                            warmup_iters=100000))
    said = capsys.readouterr().out
    shortened = re.search(r"time budget 1s: about (\d+) steps expected \(guessed from the first evaluation\), no "
                          r"more than --warmup-iters 100000: the warmup is shortened to (\d+) steps", said)
    assert shortened and said.find(shortened[0]) < said.find("leave time for"), said
    warmup = int(shortened[2])
    assert records(out, "train")[0]["lr"] == pytest.approx(3e-3 / warmup)  # the first step already follows it
    final = read_config(out)["train"]["warmup_iters"]
    assert final <= warmup
    (plan_line,) = [line for line in said.splitlines() if "leave time for" in line]
    assert ("shortened" in plan_line) == (final != warmup)  # the plan says only what it changed itself


def test_with_compile_the_warmup_is_shortened_by_the_measured_plan_only(tmp_path, corpus, monkeypatch, capsys):
    """--compile's compilation is in the step-0 evaluation's time: a guess from it would cut a warmup that the
    measured steps have room for. Here the evaluation is made slow as a compilation makes it (torch.compile itself
    is left out: what is tested is what the budget does with the slow evaluation)."""
    evaluate, calls = trainer.evaluate_loss, []

    def compiling_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_loss", compiling_first)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    out = train(tiny_config(*corpus, tmp_path / "out", max_time="3s", eval_interval=1000, eval_iters=1,
                            warmup_iters=20, compile=True))
    said = capsys.readouterr().out
    assert "(guessed from the first evaluation, its compilation included)" in said  # the warning is kept
    assert "the warmup is shortened" not in said and "shortened to" not in said, said
    (plan,) = records(out, "plan")
    assert plan["max_iters"] > 20 and plan["warmup_iters"] == 20  # room for the whole warmup, and it is kept
    assert records(out, "train")[0]["lr"] == pytest.approx(3e-3 / 20)


@pytest.mark.parametrize("budget, message", [("0.5s", "max_time 0.5s is too short to plan a run in"),
                                             ("-5s", "max_time must be a positive duration")])
def test_budgets_that_cannot_be_kept_are_refused_in_one_line(budget, message):
    import train as train_cli

    with pytest.raises(ConfigError) as error:
        train_cli.make_config(["--max-time", budget])
    assert message in str(error.value) and "\n" not in str(error.value)
