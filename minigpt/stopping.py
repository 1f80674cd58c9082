"""When a run ends: early stopping on the validation loss, and the number of steps that fits a time budget.

Both are small state machines kept out of the training loop, which only feeds them measurements and asks them
questions; both save their state with the checkpoint so that a resumed run ends where the straight one would.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

SKIP_STEPS = 2  # the first steps pay for one-off work (torch.compile, allocator warm-up): not timed
MEASURE_STEPS = 20  # steps timed before the budget fixes the step count
CORRECT_AT = (0.25, 0.5)  # fractions of the planned steps after which the plan is corrected with all times so far


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without a validation loss below best − min_delta.

    As in Keras's EarlyStopping callback, `best` moves only on an improvement that counts, so a run cannot creep
    on by improvements each smaller than min_delta. patience None never stops (the counter is still kept).
    """

    patience: int | None
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, val_loss: float, step: int) -> None:
        if val_loss < self.best - self.min_delta:  # False for NaN: a NaN loss is no improvement
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
        else:
            self.bad_evals += 1

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "min_delta")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


class TimeBudget:
    """--max-time: time the first training steps and one evaluation + save, then fix the step count that fits.

    The budget is for training, evaluations and saves: the clock starts with the loop (`start`), after the data
    is prepared (a first run spends a while training the tokenizer; later runs reuse the prepared tokens).

    The step count is fixed rather than the run being cut off when the time is up, so that the learning-rate
    schedule runs its whole course (warmup, decay to min_lr) over the steps there is time for: the budget ends
    with an annealed model, not one caught at a high learning rate.

    Twenty steps are a short sample: on a shared machine one step can take 20 % more or less than the next, and a
    passing load can slow all twenty. So the plan is corrected twice, a quarter and half-way through the planned
    steps, with the mean of every step timed so far; the schedule then stretches or shrinks a little while the
    learning rate is still high, and the second half of the run goes as planned.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()  # start() sets it again when the training loop begins
        self.step_times: list[float] = []
        self.steps_seen = 0
        self.planned = False  # True once the step count is fixed (here, or by the run a checkpoint came from)
        self.eval_s = 0.0  # one evaluation + save, timed at the first plan
        self.corrections: list[int] = []  # steps at which the plan is corrected (none after a resume)

    def start(self) -> None:
        self.started = time.perf_counter()

    def add_step(self, seconds: float) -> None:
        self.steps_seen += 1
        if self.steps_seen > SKIP_STEPS:
            self.step_times.append(seconds)

    @property
    def ready(self) -> bool:
        """Enough steps are timed: time to evaluate, save, and plan."""
        return not self.planned and len(self.step_times) >= MEASURE_STEPS

    @property
    def step_s(self) -> float:
        return sum(self.step_times) / len(self.step_times)  # the mean: what a sum of many steps costs

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def due(self, step: int) -> bool:
        """Whether the plan is to be corrected at `step`."""
        return bool(self.corrections) and step >= self.corrections[0]

    def plan(self, step: int, eval_interval: int, eval_s: float | None = None) -> int:
        """The total step count for a run now at `step` (see plan_steps): the first plan (with the time of an
        evaluation + save, `eval_s`), or a correction of it when `due`. `commit` the count that is chosen."""
        if not self.planned:
            self.eval_s = eval_s or 0.0
        return plan_steps(self.seconds, self.elapsed(), step, self.step_s, self.eval_s, eval_interval)

    def commit(self, step: int, steps: int) -> None:
        """Record the step count chosen at `step` (rank 0's, under DDP, so that every rank corrects at the same
        steps); the first plan sets the steps at which it will be corrected."""
        if self.planned:
            self.corrections.pop(0)
        else:
            self.corrections = sorted({step + max(1, round(f * (steps - step))) for f in CORRECT_AT})
        self.planned = True


def plan_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
               eval_interval: int) -> int:
    """The largest total step count n > step whose remaining cost fits in what is left of the budget.

    From `step` to n the run takes n − step steps of step_s seconds, and an evaluation + save (eval_s) at every
    multiple of eval_interval and at n itself: ceil(n / eval_interval) − floor(step / eval_interval) of them.
    The cost grows with n, so a bisection finds the largest n that fits. At least one more step is always
    planned, so that the run ends with an evaluation and a checkpoint even when the budget is already spent.
    """
    def cost(n: int) -> float:
        return (n - step) * step_s + (-(-n // eval_interval) - step // eval_interval) * eval_s

    left = budget_s - elapsed_s
    low, high = step + 1, step + 1 + int(max(left, 0.0) / max(step_s, 1e-9))  # cost(high) > left
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= left:
            low = middle
        else:
            high = middle - 1
    return low


def format_duration(seconds: float) -> str:
    """42.3s, 1m 58.2s, 1h 02m 05s: a run's length as people read it."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m {secs:.1f}s"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {int(secs):02d}s"
