"""When a run ends: the early-stopping counter, the step count a time budget allows, durations as text."""
import math

import pytest

from minigpt.config import parse_duration
from minigpt.errors import ConfigError
from minigpt import stopping
from minigpt.stopping import EarlyStopping, format_duration, plan_steps


def test_early_stopping_counts_evaluations_without_an_improvement_of_min_delta():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    stopper.update(5.0, 10)  # the first evaluation always improves on inf
    assert (stopper.best, stopper.best_step, stopper.bad_evals, stopper.should_stop) == (5.0, 10, 0, False)
    stopper.update(4.95, 20)  # better, but by less than min_delta: does not count, and best stays
    assert (stopper.best, stopper.bad_evals, stopper.should_stop) == (5.0, 1, False)
    stopper.update(4.85, 30)  # 0.15 below the best: an improvement, the counter starts again
    assert (stopper.best, stopper.best_step, stopper.bad_evals) == (4.85, 30, 0)
    stopper.update(4.80, 40)
    stopper.update(math.nan, 50)  # NaN is never an improvement
    assert stopper.bad_evals == 2 and stopper.should_stop


def test_early_stopping_off_never_stops_but_its_state_round_trips():
    stopper = EarlyStopping(patience=None)
    for step, loss in enumerate([3.0, 3.1, 3.2, 3.3, 3.4]):
        stopper.update(loss, step)
    assert stopper.bad_evals == 4 and not stopper.should_stop
    copy = EarlyStopping(patience=3)
    copy.load_state_dict(stopper.state_dict())
    assert (copy.best, copy.best_step, copy.bad_evals, copy.should_stop) == (3.0, 0, 4, True)


def simulated_run_time(step, n, step_s, eval_s, interval):
    """Walk the run step by step: each step costs step_s, each evaluation + save (every `interval` steps, and
    after the last step) costs eval_s."""
    total = 0.0
    for k in range(step + 1, n + 1):
        total += step_s
        if k % interval == 0 or k == n:
            total += eval_s
    return total


@pytest.mark.parametrize("budget,elapsed,step,step_s,eval_s,interval", [
    (120, 5.0, 22, 0.08, 0.9, 250), (120, 5.0, 22, 0.08, 0.9, 7), (600, 30, 0, 1.3, 12.0, 50),
    (10, 2.0, 30, 0.01, 0.5, 1), (60, 59.99, 22, 0.5, 1.0, 10), (60, 80.0, 22, 0.5, 1.0, 10),
])
def test_planned_steps_are_the_most_that_fit(budget, elapsed, step, step_s, eval_s, interval):
    n = plan_steps(budget, elapsed, step, step_s, eval_s, interval)
    left = budget - elapsed
    assert n >= step + 1  # always one more step, which ends with an evaluation and a save
    if n > step + 1:
        assert simulated_run_time(step, n, step_s, eval_s, interval) <= left + 1e-9
    assert simulated_run_time(step, n + 1, step_s, eval_s, interval) > left - 1e-9  # one more would not fit


def test_planned_steps_use_the_whole_budget():
    n = plan_steps(120, 5.0, 22, 0.08, 0.9, 250)
    assert 115 - 0.08 - 0.9 < simulated_run_time(22, n, 0.08, 0.9, 250) <= 115


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), (" 2M ", 120),
                                          (".5s", 0.5)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "0", "0m", "10d", "-1m", "", "1h30m", "m"])
def test_bad_durations_say_what_is_accepted(text):
    with pytest.raises(ConfigError, match="such as 90s, 10m or 1.5h"):
        parse_duration(text)


def test_durations_print_as_people_read_them():
    assert [format_duration(s) for s in (42.34, 118.2, 3725.0)] == ["42.3s", "1m 58.2s", "1h 02m 05s"]


def test_time_budget_corrects_its_plan_with_the_step_times_measured_since(monkeypatch):
    """Twenty fast steps, then a machine that turns busy: the corrections a quarter and half-way through shrink the
    plan, and the run ends at its budget instead of nearly twice past it."""
    clock = [0.0]
    monkeypatch.setattr(stopping.time, "perf_counter", lambda: clock[0])
    budget = stopping.TimeBudget(100.0)
    budget.start()
    step = 0

    def run(seconds: float) -> None:
        nonlocal step
        clock[0] += seconds
        budget.add_step(seconds)
        step += 1

    while not budget.ready:
        run(0.1)
    assert step == stopping.SKIP_STEPS + stopping.MEASURE_STEPS
    first = budget.plan(step, 10**9, eval_s=0.0)
    assert first == plan_steps(100.0, clock[0], step, 0.1, 0.0, 10**9)
    budget.commit(step, first)
    planned, corrected_at = first, []
    while step < planned:
        run(0.2)  # the machine turned busy: every later step takes twice as long
        if budget.due(step):
            corrected_at.append(step)
            mean = sum(budget.step_times) / len(budget.step_times)
            planned = budget.plan(step, 10**9)
            assert planned == plan_steps(100.0, clock[0], step, mean, 0.0, 10**9) < first
            budget.commit(step, planned)
    plan_step = stopping.SKIP_STEPS + stopping.MEASURE_STEPS
    assert corrected_at == [plan_step + round(f * (first - plan_step)) for f in stopping.CORRECT_AT]
    without_corrections = clock[0] + (first - planned) * 0.2
    assert without_corrections > 190  # the first plan alone would nearly double the budget
    assert 95 < clock[0] < 102, clock[0]  # corrected: it ends within 2 % of the budget
