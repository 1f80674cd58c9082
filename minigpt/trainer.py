"""The training loop: data → model → optimizer steps, with evaluation, checkpoints, metrics and (optionally) DDP.

One optimizer step = `grad_accum` micro-batches on each of `world_size` processes. The training tokens are cut
into `world_size × grad_accum` shards and every (process, micro-step) pair draws from its own shard, so a run on
2 processes with grad_accum 1 sees the very same batches as a run on 1 process with grad_accum 2: the two differ
only in the order of a floating-point sum.

Beside the loop: torchrun's set-up and collectives are in distributed.py, what a checkpoint must hold to resume
(and the checks that a resume continues the same run) in train_state.py, the step count and learning rate in
optim.Schedule, and when to stop (early stopping, a time budget) in stopping.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data.errors import DataError
from data.loader import BatchLoader
from data.lock import LockHeld, file_lock
from data.prepare import PreparedData, prepare_data
from data.sources import open_source

from .attention import choose_attention
from .checkpoint import (BEST_DIR, MANIFEST_FILE, RESUME_FILES, TOKENIZER_FILE, checkpoint_dir, foreign_files,
                         has_checkpoint, load_train_state, read_config, rng_state, save_checkpoint)
from .choices import ChoiceSet, read_items
from .config import HUB_NAME_FIELDS, PATH_FIELDS, TrainConfig, with_batch_tokens
from .device import autocast_dtype, resolve_device
from .distributed import Dist, resume_command
from .errors import CheckpointError, ConfigError, MinigptError
from .evaluate import evaluate_loss
from .hf import load_into, load_tokenizer, open_tokenizer
from .mfu import choose_peak, mfu
from .model import GPT
from .optim import Schedule, clip_grad_norm, make_optimizer, set_lr
from .plot import plot_losses
from .stopping import MEASURE_STEPS, SKIP_STEPS, EarlyStopping, TimeBudget, format_duration, plan_steps
from .train_state import PRECISIONS, TrainState, check_same_run, check_same_tokenizer, resume_precision

__all__ = ["train", "TrainingError", "resume_command", "read_resume_config", "next_step_hint", "loader_rank"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"  # held by the run writing into the folder
# An optimizer step costs about this many evaluation batches (forward + backward + update against a forward
# without gradients; 2-4x measured on CPUs): a time budget's first guess of the step time, before any is timed.
STEP_COST_IN_EVAL_BATCHES = 3


class TrainingError(MinigptError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is left in place."""


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; returns the output folder. Ctrl-C saves a checkpoint, then raises KeyboardInterrupt."""
    world = Dist.from_env()
    cfg = with_batch_tokens(cfg, world.world_size)  # --total-batch-tokens sets grad_accum
    world.check_device_name(cfg.device)
    device = resolve_device(cfg.device, world.local_rank)
    with world.process_group(device):
        run = _Run(cfg, world, device)
        try:
            with run.own_out_dir():
                out = run.fit()
            world.barrier()  # leave together: rank 0 may still be saving the last checkpoint
            return out
        finally:
            run.step_model = None  # the DDP wrapper holds the process group, which is destroyed on the way out


def read_resume_config(out: str | Path) -> dict[str, Any]:
    """config.json of the resumable checkpoint in `out`; when there is none yet because a run is still starting
    in that folder (it saves first at its first evaluation), a ConfigError that says so."""
    try:
        return read_config(checkpoint_dir(out, RESUME_FILES))
    except CheckpointError:
        writer = _writer_of(Path(out))
        if writer is None and Path(out).is_dir() and not any((Path(out) / name).exists() for name in RESUME_FILES) \
                and not has_checkpoint(out):  # nothing was ever saved: a first run stopped before its first save
            raise CheckpointError(f"{Path(out) / MANIFEST_FILE} is missing: no checkpoint was saved in {out} (a run "
                                  f"stopped before its first evaluation leaves only its prepared data); start the run "
                                  f"again without --resume, and it reuses the prepared tokens") from None
        if writer is None:
            raise
        raise ConfigError(f"another run ({writer}) is writing into {out} and has not saved a checkpoint yet; "
                          f"resume once it has (it saves every --eval-interval steps) or has stopped") from None


def next_step_hint(out: Path) -> str:
    """How to train the run in `out` further: a larger --patience for one that stopped early, else --max-iters."""
    try:
        config, state = read_config(out), TrainState.read(out)
    except CheckpointError:
        return f"{resume_command(out)} --max-iters N"
    stopper = state.early_stopping_under(config.get("train", {}).get("patience"))
    if stopper.should_stop:  # it stopped early: more steps would not be taken
        return f"{resume_command(out)} --patience N (N > {stopper.bad_evals})"
    return f"{resume_command(out)} --max-iters N"


class _Run:
    """One training run; an object only so that the loop's many pieces of state have names."""

    def __init__(self, cfg: TrainConfig, world: Dist, device: torch.device) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.out = Path(cfg.out_dir)
        self.amp_dtype = autocast_dtype(cfg.dtype, device)  # a resume may continue in its checkpoint's (see fit)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # see fit
        self.kept_scaler: dict[str, Any] = {}  # a float16 checkpoint's scaler, kept while training in another dtype
        self.attention = choose_attention(cfg.attention, cfg.model, device, training=True)
        self.skipped_steps = 0
        self.schedule = Schedule.from_config(cfg)
        self.early_stop = EarlyStopping(cfg.patience, cfg.min_delta)
        self.budget = TimeBudget(cfg.max_time_s) if cfg.max_time is not None else None
        self.stop_requested = False
        self.step, self.best_val, self.best_step = 0, math.inf, None
        self.process_started = self.started = time.perf_counter()  # started: the run's; a resume moves it back
        self.eval_batch_s: float | None = None  # one evaluation batch, timed (a time budget's first guess)

    # ------------------------------------------------------------------------------------------ set-up
    @contextlib.contextmanager
    def own_out_dir(self):
        """Create the output and data folders (one line if impossible) and, on rank 0, hold the output folder's
        lock for the run: a second run into the same folder is refused instead of interleaving with this one."""
        cfg = self.cfg
        if cfg.resume and not self.out.is_dir():
            checkpoint_dir(self.out)  # says there is no checkpoint to resume, rather than create an empty folder
        created: list[Path] = []  # the folders made here, deepest first: removed again if a failed run left them empty
        for flag, folder in (("--out-dir", self.out), ("--data-dir", Path(cfg.data_dir or self.out / "data"))):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{flag} {folder} is a file, not a folder; give a folder to write into")
            missing = [f for f in (folder, *folder.parents) if not f.exists()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create {flag} {folder} ({exc.strerror or exc}); give a folder that can "
                                  f"be created and written to") from None
            created = missing + created
        try:
            if not self.world.main:  # one lock per run, however many processes it has
                yield
                return
            try:
                with file_lock(self.out / LOCK_FILE, wait=False):
                    yield
            except LockHeld as held:
                raise ConfigError(f"another run ({held.holder or 'starting up'}) is writing into {self.out}; wait "
                                  f"for it to finish, or give another --out-dir") from None
            except OSError as exc:
                if exc.filename != str(self.out / LOCK_FILE):
                    raise
                raise ConfigError(f"cannot write into --out-dir {self.out} ({exc.strerror or exc}); give a folder "
                                  f"you can write to") from None
        except BaseException:
            for folder in created:  # only empty ones go: whatever the run wrote stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise

    def fit(self) -> Path:
        cfg = self.cfg
        if cfg.prepare_only:  # the tokens alone: on a CPU machine, say, before the GPUs are rented
            self._prepare_data(None, None)
            return self.out
        resume_config, state = self._check_out_dir()
        if state is not None:
            check_same_run(resume_config, cfg.model, cfg.optimizer, self.out)  # before a long data preparation
            if self._nothing_to_do(resume_config, state):
                return self.out
            self.amp_dtype, note = resume_precision(cfg.dtype, state.precision, self.device)
            if note:
                self.say(note)
        # float16 has too few exponent bits for small gradients: scale the loss up before backward, unscale the
        # gradients before clipping, and skip a step (halving the scale) when one overflowed. A no-op otherwise.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # read before a data preparation that may take long, so that a bad line stops the run at once
        choice_items = read_items(cfg.eval_choices) if cfg.eval_choices and self.world.main else None
        if cfg.warmup_iters > cfg.max_iters:
            self.say(f"note: --warmup-iters {cfg.warmup_iters} is longer than the run (--max-iters "
                     f"{cfg.max_iters}): the learning rate never reaches --lr {cfg.lr}")
        self.data = self._prepare_data(resume_config, state)
        self.tokenizer = self.data.tokenizer
        vocab_size = self.tokenizer.vocab_size
        if cfg.init_from:  # the pretrained embedding's rows, which may be more than the tokenizer's ids
            vocab_size = resume_config["model"]["vocab_size"] if resume_config else cfg.model.vocab_size
        self.model_config = replace(cfg.model, vocab_size=vocab_size)
        if resume_config is not None:
            check_same_tokenizer(resume_config, self.model_config, self.tokenizer.checksum, self.out)
        self._check_data_size()
        self.choices = (ChoiceSet(choice_items, self.tokenizer, self.model_config.block_size)
                        if choice_items is not None else None)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(self.model_config).to(self.device)
        self.model.attention = self.attention
        if cfg.init_from and state is None:
            load_into(self.model, cfg.init_from)
        torch.manual_seed(cfg.seed + self.world.rank)  # but a different dropout stream on each
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                        self.device.type, cfg.optimizer, cfg.muon_lr)
        self.loaders = self.make_loaders(cfg.seed)
        self.records: list[dict[str, Any]] = []
        if state is not None:
            # weights and moments (the rest is `state`); the saved parameter groups would bring back the first run's
            # weight decay, betas and Muon's rate, so this run's (the checkpoint's unless given again) are kept
            settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            load_train_state(self.out, self.model, self.optimizer)
            for group, own in zip(self.optimizer.param_groups, settings):
                group.update(own)
            state.apply(self)
            if self.world.main:
                self.records = _read_metrics(self.out / METRICS_FILE, self.step)
            self.say(f"resuming from step {self.step} in {self.out}")
        elif self.world.main:
            (self.out / METRICS_FILE).unlink(missing_ok=True)

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.peak = choose_peak(self.device, self.amp_dtype, cfg.peak_tflops)  # after TF32 is decided
        self.flops_per_token = self.model.flops_per_token(self.model_config.block_size)
        # Evaluation goes through the compiled model too (not through DDP: only rank 0 evaluates): its eval-mode,
        # no-grad graph is compiled once beside the training one. dynamic=False: a shorter last evaluation batch
        # gets a graph of its own; by default it would turn the batch size symbolic in every later graph, the
        # training step's included (slower kernels, more guards).
        self.eval_model = self.step_model = torch.compile(self.model, dynamic=False) if cfg.compile else self.model
        if self.world.enabled:  # no local name for it: train() must be able to drop the last reference
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._announce()
        self._loop()
        return self.out

    def _check_out_dir(self) -> tuple[dict[str, Any] | None, TrainState | None]:
        """Refuse to clobber a checkpoint by accident; on --resume, the checkpoint's config and training state."""
        cfg = self.cfg
        if cfg.resume:
            return read_config(checkpoint_dir(self.out, RESUME_FILES)), TrainState.read(self.out)
        if has_checkpoint(self.out) and not cfg.overwrite:
            raise ConfigError(f"{self.out} already holds a checkpoint; pass --resume to continue it, --overwrite "
                              f"to start over, or another --out-dir")
        foreign = foreign_files(self.out)
        if foreign:  # not even with --overwrite: it replaces a run of ours, never another model
            raise ConfigError(f"{self.out} holds {', '.join(foreign)} but no minigpt checkpoint (a Hugging Face model "
                              f"folder?), which a run there would overwrite; give another --out-dir")
        return None, None

    def _nothing_to_do(self, saved: dict[str, Any], state: TrainState) -> bool:
        """A resume of a run that has ended says why and does nothing (before preparing data); a time budget that
        cannot apply is refused."""
        cfg, out = self.cfg, self.out
        saved_budget = saved.get("train", {}).get("max_time")
        finished = state.step >= cfg.max_iters
        if cfg.max_time not in (None, saved_budget) and (finished or state.planned_iters is not None):
            fixed = (f"its time budget ({saved_budget}) fixed its step count at {state.planned_iters} when it began"
                     if state.planned_iters is not None else f"it is already at step {state.step} of --max-iters "
                     f"{cfg.max_iters}")
            raise ConfigError(f"--max-time {cfg.max_time} cannot apply to the run in {out}: {fixed}, and a budget "
                              f"plans a whole run from its first step; resume without a new --max-time, give a "
                              f"larger --max-iters to train it further, or start a new run in another --out-dir")
        if finished:
            self.say(f"the run in {out} is already at step {state.step} of --max-iters {cfg.max_iters}: nothing to "
                     f"do; give a larger --max-iters to train it further")
            return True
        stopper = state.early_stopping_under(cfg.patience, cfg.min_delta)
        if stopper.should_stop:
            self.say(f"the run in {out} stopped early at step {state.step}: its validation loss has not improved on "
                     f"{stopper.best:.4f} (step {stopper.best_step}) for {stopper.bad_evals} evaluations "
                     f"(--patience {cfg.patience}): nothing to do. The model to use is in {out / BEST_DIR}; to train "
                     f"on, resume with a --patience above {stopper.bad_evals}")
            return True
        return False

    def _prepare_data(self, resume_config: dict[str, Any] | None, state: TrainState | None) -> PreparedData:
        """Tokens from the cache, prepared first if needed. Under torchrun every rank asks: the first builds the
        files, the others wait on a file lock (not in a collective, which would time out on a long preparation)
        and then reuse them; only rank 0 talks. A resume encodes with the checkpoint's tokenizer, trains on the
        tokens it was trained on when its corpus is gone, and says so when the corpus has changed."""
        cfg = self.cfg
        tokenizer = cfg.tokenizer
        if state is not None and tokenizer in (None, resume_config.get("train", {}).get("tokenizer")):
            tokenizer = str(checkpoint_dir(self.out) / TOKENIZER_FILE)  # the one the model was trained with
        elif tokenizer:
            tokenizer = open_tokenizer(tokenizer)
        elif cfg.init_from:
            tokenizer = load_tokenizer(cfg.init_from, cfg.model.vocab_size)  # the pretrained model's
        data_dir = cfg.data_dir or str(self.out / "data")
        if state is not None and (cfg.data or cfg.dataset):  # (the default corpus is always there)
            try:
                open_source(cfg.data, dataset=cfg.dataset, dataset_config=cfg.dataset_config,
                            text_field=cfg.text_field)
            except DataError as gone:
                cached = state.prepared_tokens(resume_config.get("tokenizer_checksum"), Path(data_dir))
                if cached is None:
                    raise
                self.say(f"note: the corpus cannot be read ({str(gone).split(';')[0]}); resuming on the tokens "
                         f"prepared from it in {cached.dir}")
                return cached
        data = prepare_data(cfg.data, data_dir, dataset=cfg.dataset,
                            dataset_config=cfg.dataset_config, text_field=cfg.text_field, errors=cfg.errors,
                            tokenizer=tokenizer, vocab_size=cfg.vocab_size, pattern=cfg.pattern,
                            val_fraction=cfg.val_fraction, max_bytes=cfg.max_bytes, progress=cfg.progress,
                            verbose=self.world.main)
        changed = state.data_change(data) if state is not None else None
        if changed:
            self.say(changed)
        return data

    def _check_data_size(self) -> None:
        cfg, T = self.cfg, self.model_config.block_size
        shards = self.world.world_size * cfg.grad_accum
        train_n, val_n = len(self.data.train_tokens), len(self.data.val_tokens)
        if train_n < shards * (T + 1):
            per_shard = f" for each of {shards} data shards (processes × grad_accum)" if shards > 1 else ""
            raise ConfigError(f"the training split has {train_n} tokens, too few for one window of {T + 1} tokens "
                              f"(block size + 1){per_shard}; use more data or a smaller --block-size")
        if val_n < T + 1:
            raise ConfigError(f"the validation split has {val_n} tokens, fewer than one block of {T + 1}; use more "
                              f"data, a larger --val-fraction or a smaller --block-size")

    def make_loaders(self, seed: int) -> list[BatchLoader]:
        """One loader per micro-step of this rank, each on its own shard of the training tokens."""
        cfg, shards = self.cfg, self.world.world_size * self.cfg.grad_accum
        self.data_seed = seed  # saved with the checkpoint: a resume must rebuild the same loaders
        return [BatchLoader(self.data.train_tokens, self.model_config.block_size, cfg.batch_size, seed,
                            rank=loader_rank(self.world.rank, m, cfg.grad_accum), world_size=shards)
                for m in range(cfg.grad_accum)]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step, over all processes."""
        cfg = self.cfg
        return cfg.batch_size * self.model_config.block_size * cfg.grad_accum * self.world.world_size

    def _announce(self) -> None:
        cfg, c, tokens_per_step = self.cfg, self.model_config, self.tokens_per_step
        flops = self.model.flops_per_token(c.block_size)
        precision = PRECISIONS[self.amp_dtype] + ("" if self.amp_dtype is None else " autocast")
        if self.scaler.is_enabled():
            precision += " with loss scaling"
        self.say(
            f"model: {self.model.num_parameters() / 1e6:.2f}M parameters "
            f"({self.model.num_parameters(non_embedding=True) / 1e6:.2f}M non-embedding), "
            f"{c.n_layer} layers × {c.n_head} heads × {c.n_embd} wide, context {c.block_size}, "
            f"{c.positions} positions{f', from {cfg.init_from}' if cfg.init_from else ''}\n"
            f"compute: {flops / 1e6:.1f} MFLOPs per token (forward + backward), "
            f"{flops * tokens_per_step / 1e9:.1f} GFLOPs per step of {tokens_per_step:,} tokens ({cfg.batch_size} "
            f"x {c.block_size} x grad_accum {cfg.grad_accum} x {self.world.world_size} process(es))\n"
            f"data: {len(self.data.train_tokens):,} train / {len(self.data.val_tokens):,} val tokens, "
            f"vocabulary {self.tokenizer.vocab_size}\n"
            f"device: {self.device}, {precision}, {self.model.attention} attention"
            f"{', compiled' if cfg.compile else ''}, {self.world.world_size} process(es)\n{self.peak.reason}")

    def say(self, message: str) -> None:
        if self.world.main:
            tqdm.write(message, file=sys.stdout)

    # --------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        cfg, schedule = self.cfg, self.schedule  # schedule.max_iters: a time budget fixes it after the first steps
        tokens_per_step = self.tokens_per_step
        bar = tqdm(total=schedule.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.world.main))
        first_step = self.step
        if self.budget is not None:
            self.budget.start()
        if self.step == 0:
            self._evaluate()
            if self.budget is not None:
                self._foresee_budget()
        restore_signals = self._catch_stop_signals()
        step_time = None
        try:
            while self.step < schedule.max_iters or (self.budget is not None and not self.budget.planned):
                started = time.perf_counter()
                loss, grad_norm, stop = self._train_step()
                self.step += 1
                seconds = time.perf_counter() - started
                step_time = seconds if step_time is None else 0.9 * step_time + 0.1 * seconds  # smoothed for display
                if self.budget is not None:
                    self.budget.add_step(seconds)
                if self.world.main:
                    scaling = {"skipped": self.skipped_steps} if self.scaler.is_enabled() else {}
                    bar.update(1)
                    shown_mfu = {k: f"{v:.1%}" for k, v in self._mfu(tokens_per_step / step_time).items()}
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}",
                                    tok_s=f"{tokens_per_step / step_time:,.0f}", **shown_mfu, **scaling, refresh=False)
                    if self.step % cfg.log_interval == 0:
                        if scaling:
                            scaling = {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}
                        self._log({"kind": "train", "step": self.step, "loss": loss, "lr": self._lr(),
                                   "grad_norm": grad_norm, "tokens_per_sec": tokens_per_step / seconds, **scaling,
                                   **self._mfu(tokens_per_step / seconds)})
                plan_now = self.budget is not None and self.budget.ready
                if self.step % cfg.eval_interval == 0 or self.step == schedule.max_iters or plan_now:
                    checked = time.perf_counter()
                    self._evaluate_and_save()
                    if plan_now:
                        self._fix_step_count(time.perf_counter() - checked)
                        bar.total = schedule.max_iters
                        bar.refresh()
                elif stop:
                    self._save()
                elif self.budget is not None and self.budget.due(self.step):
                    self._fix_step_count()
                    bar.total = schedule.max_iters
                if stop:
                    bar.close()
                    self.say(f"stopped at step {self.step}; checkpoint saved in {self.out}; continue with "
                             f"`{resume_command(self.out)}`")
                    raise KeyboardInterrupt
                if self.early_stop.should_stop:
                    self._stop_early()
                    break
        finally:
            restore_signals()
            bar.close()
        self.say(self._summary(first_step))

    def _evaluate_and_save(self) -> None:
        """Evaluate, update best/ and the early-stopping counter, save. Collective under DDP."""
        val_loss = self.world.from_main(self._evaluate(), self.device)
        best = math.isfinite(val_loss) and val_loss < self.best_val
        if best:
            self.best_val, self.best_step = val_loss, self.step
        self.early_stop.update(val_loss, self.step)
        self._save(best)

    def _foresee_budget(self) -> None:
        """--max-time, before the first step: guess the step time from the evaluation just made, and say now what
        the budget will do. A budget shorter than the measuring phase (the steps that are timed, an evaluation
        and a save) cannot be kept: warn. A warmup as long as the steps there is time for would never end: shorten
        it now, so that the steps it covers are those of the shortened warmup; but not with --compile, whose
        compilation is in that evaluation's time (a guess many times too long: a warmup of 100 was cut to 8 where
        the timed steps left room for 266), and the measured plan (_fix_step_count) shortens it if need be."""
        cfg, schedule = self.cfg, self.schedule
        batch_s = self.world.from_main(self.eval_batch_s or 0.0, self.device)  # rank 0 evaluated: its numbers
        step_s, eval_s = STEP_COST_IN_EVAL_BATCHES * cfg.grad_accum * batch_s, 2 * cfg.eval_iters * batch_s
        measuring = (SKIP_STEPS + MEASURE_STEPS) * step_s + eval_s
        if measuring > self.budget.seconds:
            self.say(f"warning: --max-time {cfg.max_time} is shorter than the first {SKIP_STEPS + MEASURE_STEPS} "
                     f"steps, an evaluation and a save, which the run times before it fixes its step count: about "
                     f"{format_duration(measuring)} here (guessed from the first evaluation"
                     f"{', its compilation included' if cfg.compile else ''}). It will run over its "
                     f"budget; give a longer --max-time, or --max-iters N")
        expected = plan_steps(self.budget.seconds, self.budget.elapsed(), 0, max(step_s, 1e-9), eval_s,
                              cfg.eval_interval)
        if schedule.warmup_iters >= expected and not cfg.compile:
            schedule.warmup_iters = expected // 10
            self.say(f"time budget {cfg.max_time}: about {expected} step{'s' * (expected != 1)} expected (guessed "
                     f"from the first evaluation), no more than --warmup-iters {cfg.warmup_iters}: the warmup is "
                     f"shortened to {schedule.warmup_iters} steps")

    def _fix_step_count(self, eval_s: float | None = None) -> None:
        """--max-time: the first steps, an evaluation and a save are timed; fix max_iters for the whole run. Called
        again (without eval_s) when the budget is due to correct its plan with the step times measured since."""
        cfg, budget, schedule = self.cfg, self.budget, self.schedule
        first = not budget.planned
        steps = int(self.world.from_main(budget.plan(self.step, cfg.eval_interval, eval_s), self.device))
        budget.commit(self.step, steps)
        warmup = before = schedule.warmup_iters  # (shortened before training if the guess said so)
        if first and warmup >= steps:  # else the rate would never decay
            warmup = steps // 10
        schedule.max_iters, schedule.warmup_iters = steps, warmup  # saved with every checkpoint from now on
        if self.world.main:
            self._log({"kind": "plan" if first else "replan", "step": self.step, "max_iters": steps,
                       "warmup_iters": warmup, "budget_s": budget.seconds, "step_s": budget.step_s,
                       "eval_save_s": budget.eval_s})
        if not first:
            return  # a correction is in metrics.jsonl; the progress bar shows the new total
        shortened = f"; --warmup-iters {cfg.warmup_iters} shortened to {warmup}" if warmup != before else ""
        self.say(f"time budget {cfg.max_time}: {budget.step_s * 1e3:.1f} ms per step and {eval_s:.2f} s per "
                 f"evaluation + save leave time for {steps} steps in all{shortened}")

    def _stop_early(self) -> None:
        stopper = self.early_stop
        if self.world.main:  # best_*: the model in best/ (the stopper's reference moves only by more than min_delta)
            self._log({"kind": "stop", "step": self.step, "reason": "early_stopping", "patience": stopper.patience,
                       "min_delta": stopper.min_delta, "best_val_loss": self.best_val, "best_step": self.best_step})
        by = f" by more than {stopper.min_delta:g}" if stopper.min_delta else ""
        self.say(f"early stopping at step {self.step}: the validation loss has not improved{by} on "
                 f"{stopper.best:.4f} (step {stopper.best_step}) for {stopper.patience} evaluations; the model "
                 f"with the lowest validation loss ({self.best_val:.4f}, step {self.best_step}) is in "
                 f"{self.out / BEST_DIR}")

    def _summary(self, first_step: int) -> str:
        """How long the run took (and, with --max-time, against its budget)."""
        took = format_duration(time.perf_counter() - self.started)
        if first_step > 0:
            return (f"done: step {self.step}, {format_duration(time.perf_counter() - self.process_started)} since "
                    f"resuming at step {first_step} ({took} in all)")
        if self.budget is None:
            return f"done: {self.step} steps in {took}"
        used = self.budget.elapsed()
        return (f"done: {self.step} steps in {took}, of which training, evaluations and saves "
                f"{format_duration(used)}: {used / self.budget.seconds:.1%} of the {self.cfg.max_time} budget")

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _mfu(self, tokens_per_sec: float) -> dict[str, float]:
        """{"mfu": the model FLOPs utilisation of all processes at this rate}, or {} without a known peak."""
        if self.peak.flops is None:
            return {}
        return {"mfu": mfu(self.flops_per_token, tokens_per_sec, self.peak.flops, self.world.world_size)}

    def _train_step(self) -> tuple[float, float | None, bool]:
        """One optimizer step; returns (mean loss, pre-clip gradient norm or None for a step skipped by the float16
        loss scaler, whether any rank was asked to stop)."""
        cfg = self.cfg
        set_lr(self.optimizer, self.schedule.lr_at(self.step))
        loss_sum = torch.zeros((), device=self.device)
        for m, loader in enumerate(self.loaders):
            x, y = (self._to_device(a) for a in loader.next_batch())
            last = m == cfg.grad_accum - 1
            # DDP all-reduces gradients in backward(); only the last micro-batch's backward needs to.
            sync = contextlib.nullcontext() if last or not self.world.enabled else self.step_model.no_sync()
            with sync:
                with self._autocast():
                    _, loss = self.step_model(x, y, label_smoothing=cfg.label_smoothing)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)  # true gradients from here on: the clip and the logged norm see them
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        # One small all-reduce per step: the mean loss for the log, and a stop request from any rank, so that
        # all ranks leave the loop after the same step.
        packed = self.world.sum_(torch.stack([loss_sum / cfg.grad_accum, grad_norm.to(self.device).float(),
                                              torch.tensor(float(self.stop_requested), device=self.device)]))
        packed[:2] /= self.world.world_size
        loss_value, norm_value, stop = packed.tolist()
        # Under float16 an infinite gradient is an overflow of the scaled loss, which the scaler handles.
        if not math.isfinite(loss_value) or not (math.isfinite(norm_value) or self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"the loss became non-finite (loss {loss_value}, gradient norm {norm_value}) at step "
                                f"{self.step + 1}; the last good checkpoint is in {self.out}. Try a lower --lr, "
                                f"a --grad-clip, or --dtype float32")
        self.scaler.step(self.optimizer)  # optimizer.step(), unless float16 gradients overflowed
        self.scaler.update()  # after an overflow halve the scale; after 2000 steps without one, double it
        self.optimizer.zero_grad(set_to_none=True)
        skipped = not math.isfinite(norm_value)
        self.skipped_steps += skipped
        return loss_value, None if skipped else norm_value, stop > 0

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _catch_stop_signals(self):
        """First Ctrl-C (or SIGTERM, as a cluster sends before pre-empting): finish the step, save, stop.
        A second Ctrl-C interrupts at once."""
        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.world.main:
                tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again to quit now)",
                           file=sys.stderr)

        try:
            previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals cannot be caught here
            return lambda: None
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    # ---------------------------------------------------------------------------- evaluation and saving
    def _evaluate(self) -> float:
        """Validation loss, after logging train and validation metrics on fixed windows (rank 0 only: the other
        ranks get inf and wait at their next collective call)."""
        if not self.world.main:
            return math.inf
        cfg, T = self.cfg, self.model_config.block_size
        byte_lengths = self.tokenizer.token_byte_lengths()
        started = time.perf_counter()
        results = {split: evaluate_loss(self.eval_model, tokens, T, cfg.batch_size, cfg.eval_iters, byte_lengths,
                                        self.device, self.amp_dtype)
                   for split, tokens in (("train", self.data.train_tokens), ("val", self.data.val_tokens))}
        self.eval_batch_s = (time.perf_counter() - started) / (2 * cfg.eval_iters)
        record = {"kind": "eval", "step": self.step}
        for split, r in results.items():
            record.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"],
                           f"{split}_bits_per_byte": r["bits_per_byte"]})
        choices = ""
        if self.choices is not None:
            scored = self.choices.score(self.model, cfg.batch_size, self.device, self.amp_dtype)
            record.update({f"choices_{k}": v for k, v in scored.items()})
            choices = f", choices acc {scored['acc']:.4f} / acc_norm {scored['acc_norm']:.4f} of {scored['n']}"
        self._log(record)
        self.say(f"step {self.step}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                 f"val perplexity {record['val_perplexity']:.2f}, val bits/byte {record['val_bits_per_byte']:.4f}"
                 f"{choices}")
        plot_losses(self.records, self.out / PLOT_FILE)
        return record["val_loss"]

    def _save(self, best: bool = False) -> None:
        """Latest checkpoint (resumable) and, when `best`, best/ too. Collective under DDP."""
        rng_json, rng_tensors = rng_state()
        per_rank = self.world.gather(([loader.state_dict() for loader in self.loaders], rng_json,
                                      {k: v.cpu() for k, v in rng_tensors.items()}))
        if not self.world.main:
            return
        config = {"model": self.model_config.to_dict(), "train": self._settings(), "step": self.step,
                  "tokenizer_checksum": self.tokenizer.checksum}
        state, tensors = TrainState.capture(self, per_rank).to_files()
        save_checkpoint(self.out, self.model, self.tokenizer, config, self.optimizer, state, tensors)
        if best:
            save_checkpoint(self.out / BEST_DIR, self.model, self.tokenizer, config)

    def _settings(self) -> dict[str, Any]:
        """The training settings as config.json records them: the step count and warmup the run follows (a time
        budget fixes them), and paths resolved, so that a resume from another working folder finds them."""
        settings = {k: v for k, v in self.cfg.to_dict().items() if k != "model"}
        settings.update(max_iters=self.schedule.max_iters, warmup_iters=self.schedule.warmup_iters)
        for name in PATH_FIELDS:
            value = settings[name]
            if value is not None and (name not in HUB_NAME_FIELDS or Path(value).exists()):  # else a hub name
                settings[name] = os.path.abspath(value)
        return settings

    def elapsed(self) -> float:
        """Seconds since the run started, --resume's processes included (from the checkpoint's state)."""
        return round(time.perf_counter() - self.started, 3)

    def _log(self, record: dict[str, Any]) -> None:
        record["elapsed_s"] = self.elapsed()
        self.records.append(record)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def loader_rank(rank: int, micro_step: int, grad_accum: int) -> int:
    """The data shard of (process `rank`, micro-step): shards are numbered process-major."""
    return rank * grad_accum + micro_step


def _writer_of(out: Path) -> str | None:
    """The run holding `out`'s lock ("pid N on HOST", or "starting up"), or None when no run does."""
    if not out.is_dir():
        return None
    try:
        with file_lock(out / LOCK_FILE, wait=False):
            return None
    except LockHeld as held:
        return held.holder or "starting up"
    except OSError:  # a folder we cannot write to: nobody we can know of
        return None


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of a resumed run up to its checkpoint; later ones (written before a kill) are dropped from the file."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            record = json.loads(line)
            if isinstance(record, dict) and record.get("step", math.inf) <= up_to_step:
                records.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return records
