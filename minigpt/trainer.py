"""The training loop: data → model → AdamW steps, with evaluation, checkpoints, metrics and (optionally) DDP.

One optimizer step = `grad_accum` micro-batches on each of `world_size` processes. The training tokens are cut
into `world_size × grad_accum` shards and every (process, micro-step) pair draws from its own shard, so a run on
2 processes with grad_accum 1 sees the very same batches as a run on 1 process with grad_accum 2: the two differ
only in the order of a floating-point sum.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from data.loader import BatchLoader
from data.lock import LockHeld, file_lock
from data.prepare import PreparedData, prepare_data

from .attention import choose_attention
from .checkpoint import (RESUME_FILES, TOKENIZER_FILE, checkpoint_dir, has_checkpoint, load_train_state, read_config,
                         rng_state, save_checkpoint, set_rng_state)
from .config import GPTConfig, TrainConfig
from .device import autocast_dtype, resolve_device
from .errors import CheckpointError, ConfigError, MinigptError
from .evaluate import evaluate_loss
from .hf import load_into, load_tokenizer
from .model import GPT
from .optim import clip_grad_norm, lr_at, make_optimizer, set_lr
from .plot import plot_losses
from .stopping import EarlyStopping, TimeBudget, format_duration

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
LOCK_FILE = ".lock"  # held by the run writing into the folder


class TrainingError(MinigptError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is left in place."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run as plain `python train.py`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; returns the output folder. Ctrl-C saves a checkpoint, then raises KeyboardInterrupt."""
    world = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))
    if world.enabled and ":" in cfg.device:
        raise ConfigError(f"under torchrun each process uses the GPU of its LOCAL_RANK; pass --device cuda (or auto), "
                          f"not --device {cfg.device}")
    device = resolve_device(cfg.device, world.local_rank)
    if world.enabled and device.type == "mps":
        raise ConfigError("torchrun with --device mps is not supported (one Apple GPU per machine); train with "
                          "plain `python train.py --device mps`, or use cuda or cpu under torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives and RNG calls that use "the current device" mean this rank's GPU
    if world.enabled:
        # DDP imports torch.distributed.nn (through torch.distributed._shard), whose functions have `group=WORLD`
        # defaults: imported after the group exists, they would hold it for good, and destroy_process_group()
        # could not free it (see below).
        importlib.import_module("torch.distributed.nn")  # not `import torch.distributed.nn`: that would make
        # `torch` a local name of this whole function, unbound at the set_device call above
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    run = _Run(cfg, world, device)
    try:
        with run.own_out_dir():
            out = run.fit()
        if world.enabled:
            dist.barrier()  # leave together: rank 0 may still be saving the last checkpoint
        return out
    finally:
        if world.enabled:
            # Free the group now, while the interpreter is whole. A gloo group that survives to interpreter
            # shutdown has worker threads that may still release a finished collective there, which aborts the
            # process (SIGABRT, "terminate called without an active exception"). The DDP wrapper holds the
            # group and sits in reference cycles, hence the collection before destroying.
            run.step_model = None
            gc.collect()
            dist.destroy_process_group()


class _Run:
    """One training run; an object only so that the loop's many pieces of state have names."""

    def __init__(self, cfg: TrainConfig, world: Dist, device: torch.device) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.out = Path(cfg.out_dir)
        self.amp_dtype = autocast_dtype(cfg.dtype, device)
        self.attention = choose_attention(cfg.attention, cfg.model, device, training=True)
        # float16 has too few exponent bits for small gradients: scale the loss up before backward, unscale the
        # gradients before clipping, and skip a step (halving the scale) when one overflowed. A no-op otherwise.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.skipped_steps = 0
        self.early_stop = EarlyStopping(cfg.patience, cfg.min_delta)
        self.budget = TimeBudget(cfg.max_time_s) if cfg.max_time is not None else None
        self.stop_requested = False
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------------ set-up
    @contextlib.contextmanager
    def own_out_dir(self):
        """Create the output and data folders (one line if impossible) and, on rank 0, hold the output folder's
        lock for the run: a second run into the same folder is refused instead of interleaving with this one."""
        cfg = self.cfg
        if cfg.resume and not self.out.is_dir():
            checkpoint_dir(self.out)  # says there is no checkpoint to resume, rather than create an empty folder
        for flag, folder in (("--out-dir", self.out), ("--data-dir", Path(cfg.data_dir or self.out / "data"))):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{flag} {folder} is a file, not a folder; give a folder to write into")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create {flag} {folder} ({exc.strerror or exc}); give a folder that can "
                                  f"be created and written to") from None
        if not self.world.main:  # one lock per run, however many processes it has
            yield
            return
        try:
            with file_lock(self.out / LOCK_FILE, wait=False):
                yield
        except LockHeld as held:
            raise ConfigError(f"another run ({held.holder or 'starting up'}) is writing into {self.out}; wait for "
                              f"it to finish, or give another --out-dir") from None
        except OSError as exc:
            if exc.filename != str(self.out / LOCK_FILE):
                raise
            raise ConfigError(f"cannot write into --out-dir {self.out} ({exc.strerror or exc}); give a folder you "
                              f"can write to") from None

    def fit(self) -> Path:
        cfg = self.cfg
        resume_config = self._check_out_dir()
        if resume_config is not None:
            _check_same_model(resume_config, cfg.model, self.out)  # before a data preparation that may take long
            saved_optimizer = resume_config.get("train", {}).get("optimizer", "adamw")
            if saved_optimizer != cfg.optimizer:
                raise CheckpointError(f"the checkpoint in {self.out} was trained with --optimizer {saved_optimizer}; "
                                      f"resume with it, or train a new model in another --out-dir")
            if resume_config.get("step", 0) >= cfg.max_iters:
                self._print(f"the run in {self.out} is already at step {resume_config['step']} of --max-iters "
                            f"{cfg.max_iters}: nothing to do; give a larger --max-iters to train it further")
                return self.out
        if cfg.warmup_iters > cfg.max_iters:
            self._print(f"note: --warmup-iters {cfg.warmup_iters} is longer than the run (--max-iters "
                        f"{cfg.max_iters}): the learning rate never reaches --lr {cfg.lr}")
        self.data = self._prepare_data(resume_config)
        self.tokenizer = self.data.tokenizer
        vocab_size = self.tokenizer.vocab_size
        if cfg.init_from:  # the pretrained embedding's rows, which may be more than the tokenizer's ids
            vocab_size = resume_config["model"]["vocab_size"] if resume_config else cfg.model.vocab_size
        self.model_config = replace(cfg.model, vocab_size=vocab_size)
        if resume_config is not None:
            _check_same_tokenizer(resume_config, self.model_config, self.tokenizer.checksum, self.out)
        self._check_data_size()

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(self.model_config).to(self.device)
        self.model.attention = self.attention
        if cfg.init_from and resume_config is None:
            load_into(self.model, cfg.init_from)
        torch.manual_seed(cfg.seed + self.world.rank)  # but a different dropout stream on each
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                        self.device.type, cfg.optimizer, cfg.muon_lr)
        self.loaders = self._make_loaders(cfg.seed)
        self.step, self.best_val = 0, math.inf
        self.records: list[dict[str, Any]] = []
        if resume_config is not None:
            self._restore()
        elif self.world.main:
            (self.out / METRICS_FILE).unlink(missing_ok=True)

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
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

    def _check_out_dir(self) -> dict[str, Any] | None:
        """Refuse to clobber a checkpoint by accident; on --resume, the checkpoint's config (verified)."""
        cfg = self.cfg
        if cfg.resume:
            return read_config(checkpoint_dir(self.out, RESUME_FILES))
        if has_checkpoint(self.out) and not cfg.overwrite:
            raise ConfigError(f"{self.out} already holds a checkpoint; pass --resume to continue it, --overwrite "
                              f"to start over, or another --out-dir")
        return None

    def _prepare_data(self, resume_config: dict[str, Any] | None) -> PreparedData:
        """Tokens from the cache, prepared first if needed. Under torchrun every rank asks: the first builds the
        files, the others wait on a file lock (not in a collective, which would time out on a long preparation)
        and then reuse them; only rank 0 talks."""
        cfg = self.cfg
        tokenizer = cfg.tokenizer
        if resume_config is not None and tokenizer is None:
            tokenizer = str(checkpoint_dir(self.out) / TOKENIZER_FILE)  # the one the model was trained with
        elif cfg.init_from and tokenizer is None:
            tokenizer = load_tokenizer(cfg.init_from, cfg.model.vocab_size)  # the pretrained model's
        return prepare_data(cfg.data, cfg.data_dir or str(self.out / "data"), dataset=cfg.dataset,
                            dataset_config=cfg.dataset_config, text_field=cfg.text_field, errors=cfg.errors,
                            tokenizer=tokenizer, vocab_size=cfg.vocab_size, pattern=cfg.pattern,
                            val_fraction=cfg.val_fraction, max_bytes=cfg.max_bytes, progress=cfg.progress,
                            verbose=self.world.main)

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

    def _restore(self) -> None:
        """Continue exactly: weights, optimizer, step, best loss, RNG streams and data positions."""
        cfg, rank = self.cfg, self.world.rank
        state, tensors = load_train_state(self.out, self.model, self.optimizer)
        self.step, self.best_val = state["step"], state["best_val_loss"]
        self.started -= state.get("elapsed_s", 0.0)  # elapsed_s counts the whole run, not this process's part
        self.skipped_steps = state.get("skipped_steps", 0)
        if state.get("grad_scaler") and self.scaler.is_enabled():  # a float32/bfloat16 checkpoint has none
            self.scaler.load_state_dict(state["grad_scaler"])
        if "early_stopping" in state:
            self.early_stop.load_state_dict(state["early_stopping"])
        if self.budget is not None and state.get("planned_iters") is not None:
            self.budget.planned = True  # the step count is in cfg.max_iters (train.py takes it from the checkpoint)
        prefix = f"rng.{rank}."
        same_layout = state["world_size"] == self.world.world_size and state["grad_accum"] == cfg.grad_accum
        if same_layout:
            set_rng_state(state["rng"][rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.loaders = self._make_loaders(state.get("data_seed", cfg.seed))
            for m, loader in enumerate(self.loaders):
                loader.load_state_dict(state["loaders"][loader_rank(rank, m, cfg.grad_accum)])
        else:  # the batches cannot be replayed: draw fresh ones, not those of step 0 again
            self._print(f"note: the checkpoint was written by {state['world_size']} process(es) × grad_accum "
                        f"{state['grad_accum']}; data order restarts from a new seed")
            torch.manual_seed(cfg.seed + rank + 7919 * self.step)
            self.loaders = self._make_loaders(cfg.seed + self.step)
        if self.world.main:
            self.records = _read_metrics(self.out / METRICS_FILE, self.step)
        self._print(f"resuming from step {self.step} in {self.out}")

    def _make_loaders(self, seed: int) -> list[BatchLoader]:
        """One loader per micro-step of this rank, each on its own shard of the training tokens."""
        cfg, shards = self.cfg, self.world.world_size * self.cfg.grad_accum
        self.data_seed = seed  # saved with the checkpoint: a resume must rebuild the same loaders
        return [BatchLoader(self.data.train_tokens, self.model_config.block_size, cfg.batch_size, seed,
                            rank=loader_rank(self.world.rank, m, cfg.grad_accum), world_size=shards)
                for m in range(cfg.grad_accum)]

    def _announce(self) -> None:
        cfg, c = self.cfg, self.model_config
        tokens_per_step = cfg.batch_size * c.block_size * cfg.grad_accum * self.world.world_size
        flops = self.model.flops_per_token(c.block_size)
        self._print(
            f"model: {self.model.num_parameters() / 1e6:.2f}M parameters "
            f"({self.model.num_parameters(non_embedding=True) / 1e6:.2f}M non-embedding), "
            f"{c.n_layer} layers × {c.n_head} heads × {c.n_embd} wide, context {c.block_size}, "
            f"{c.positions} positions{f', from {cfg.init_from}' if cfg.init_from else ''}\n"
            f"compute: {flops / 1e6:.1f} MFLOPs per token (forward + backward), "
            f"{flops * tokens_per_step / 1e9:.1f} GFLOPs per step of {tokens_per_step} tokens\n"
            f"data: {len(self.data.train_tokens):,} train / {len(self.data.val_tokens):,} val tokens, "
            f"vocabulary {self.tokenizer.vocab_size}\n"
            f"device: {self.device}, {_precision(self.amp_dtype)}, {self.model.attention} attention"
            f"{', compiled' if cfg.compile else ''}, {self.world.world_size} process(es)")

    def _print(self, message: str) -> None:
        if self.world.main:
            tqdm.write(message, file=sys.stdout)

    # --------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        cfg = self.cfg  # but read max_iters from self.cfg: a time budget fixes it after the first steps
        tokens_per_step = cfg.batch_size * self.model_config.block_size * cfg.grad_accum * self.world.world_size
        if self.early_stop.should_stop:
            self._print(f"the run in {self.out} stopped early at step {self.step} ({self.early_stop.bad_evals} "
                        f"evaluations without improvement); resume with a larger --patience to train on")
            return
        bar = tqdm(total=cfg.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.world.main))
        first_step = self.step
        if self.budget is not None:
            self.budget.start()
        if self.step == 0:
            self._evaluate()
        restore_signals = self._catch_stop_signals()
        step_time = None
        try:
            while self.step < self.cfg.max_iters or (self.budget is not None and not self.budget.planned):
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
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}",
                                    tok_s=f"{tokens_per_step / step_time:,.0f}", **scaling, refresh=False)
                    if self.step % cfg.log_interval == 0:
                        if scaling:
                            scaling = {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}
                        self._log({"kind": "train", "step": self.step, "loss": loss, "lr": self._lr(),
                                   "grad_norm": grad_norm, "tokens_per_sec": tokens_per_step / seconds, **scaling})
                plan_now = self.budget is not None and self.budget.ready
                if self.step % cfg.eval_interval == 0 or self.step == self.cfg.max_iters or plan_now:
                    checked = time.perf_counter()
                    self._evaluate_and_save()
                    if plan_now:
                        self._fix_step_count(time.perf_counter() - checked)
                        bar.total = self.cfg.max_iters
                        bar.refresh()
                elif stop:
                    self._save()
                elif self.budget is not None and self.budget.due(self.step):
                    self._fix_step_count()
                    bar.total = self.cfg.max_iters
                if stop:
                    bar.close()
                    self._print(f"stopped at step {self.step}; checkpoint saved in {self.out}; continue with "
                                f"`{resume_command(self.out)}`")
                    raise KeyboardInterrupt
                if self.early_stop.should_stop:
                    self._stop_early()
                    break
        finally:
            restore_signals()
            bar.close()
        self._print(self._summary(first_step))

    def _evaluate_and_save(self) -> None:
        """Evaluate, update best/ and the early-stopping counter, save. Collective under DDP."""
        val_loss = self._from_main(self._evaluate())
        best = math.isfinite(val_loss) and val_loss < self.best_val
        if best:
            self.best_val = val_loss
        self.early_stop.update(val_loss, self.step)
        self._save(best)

    def _from_main(self, value: float) -> float:
        """Rank 0's `value` on every rank, so that what is decided from it (stop now, how many steps) is the same
        everywhere."""
        if not self.world.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def _fix_step_count(self, eval_s: float | None = None) -> None:
        """--max-time: the first steps, an evaluation and a save are timed; fix max_iters for the whole run. Called
        again (without eval_s) when the budget is due to correct its plan with the step times measured since."""
        cfg, budget = self.cfg, self.budget
        first = not budget.planned
        steps = int(self._from_main(budget.plan(self.step, cfg.eval_interval, eval_s)))
        budget.commit(self.step, steps)
        warmup = cfg.warmup_iters
        if first and warmup >= steps:  # else the rate would never decay
            warmup = steps // 10
        self.cfg = replace(cfg, max_iters=steps, warmup_iters=warmup)  # saved with every checkpoint from now on
        if self.world.main:
            self._log({"kind": "plan" if first else "replan", "step": self.step, "max_iters": steps,
                       "warmup_iters": warmup, "budget_s": budget.seconds, "step_s": budget.step_s,
                       "eval_save_s": budget.eval_s})
        if not first:
            return  # a correction is in metrics.jsonl; the progress bar shows the new total
        shortened = f"; --warmup-iters {cfg.warmup_iters} shortened to {warmup}" if warmup != cfg.warmup_iters else ""
        self._print(f"time budget {cfg.max_time}: {budget.step_s * 1e3:.1f} ms per step and {eval_s:.2f} s per "
                    f"evaluation + save leave time for {steps} steps in all{shortened}")

    def _stop_early(self) -> None:
        stopper = self.early_stop
        if self.world.main:
            self._log({"kind": "stop", "step": self.step, "reason": "early_stopping", "patience": stopper.patience,
                       "min_delta": stopper.min_delta, "best_val_loss": stopper.best, "best_step": stopper.best_step})
        by = f" by more than {stopper.min_delta:g}" if stopper.min_delta else ""
        self._print(f"early stopping at step {self.step}: the validation loss has not improved{by} on "
                    f"{stopper.best:.4f} (step {stopper.best_step}) for {stopper.patience} evaluations; the model "
                    f"with the lowest validation loss ({self.best_val:.4f}) is in {self.out / BEST_DIR}")

    def _summary(self, first_step: int) -> str:
        """How long the run took (and, with --max-time, against its budget)."""
        took = format_duration(time.perf_counter() - self.started)
        if first_step > 0:
            return f"done: step {self.step}, {took} since resuming at step {first_step}"
        if self.budget is None:
            return f"done: {self.step} steps in {took}"
        used = self.budget.elapsed()
        return (f"done: {self.step} steps in {took}, of which training, evaluations and saves "
                f"{format_duration(used)}: {used / self.budget.seconds:.1%} of the {self.cfg.max_time} budget")

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self) -> tuple[float, float | None, bool]:
        """One optimizer step; returns (mean loss, pre-clip gradient norm or None for a step skipped by the float16
        loss scaler, whether any rank was asked to stop)."""
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(self.step, cfg.lr, cfg.final_lr, cfg.warmup_iters,
                                     cfg.lr_decay_iters or cfg.max_iters, cfg.lr_schedule, cfg.decay_fraction))
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
        packed = torch.stack([loss_sum / cfg.grad_accum, grad_norm.to(self.device).float(),
                              torch.tensor(float(self.stop_requested), device=self.device)])
        if self.world.enabled:
            dist.all_reduce(packed)
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
        results = {split: evaluate_loss(self.eval_model, tokens, T, cfg.batch_size, cfg.eval_iters, byte_lengths,
                                        self.device, self.amp_dtype)
                   for split, tokens in (("train", self.data.train_tokens), ("val", self.data.val_tokens))}
        record = {"kind": "eval", "step": self.step}
        for split, r in results.items():
            record.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"],
                           f"{split}_bits_per_byte": r["bits_per_byte"]})
        self._log(record)
        self._print(f"step {self.step}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                    f"val perplexity {record['val_perplexity']:.2f}, val bits/byte {record['val_bits_per_byte']:.4f}")
        plot_losses(self.records, self.out / PLOT_FILE)
        return record["val_loss"]

    def _save(self, best: bool = False) -> None:
        """Latest checkpoint (resumable) and, when `best`, best/ too. Collective under DDP."""
        loader_states = [loader.state_dict() for loader in self.loaders]
        rng_json, rng_tensors = rng_state()
        gathered = [(loader_states, rng_json, rng_tensors)]
        if self.world.enabled:
            gathered = [None] * self.world.world_size
            dist.all_gather_object(gathered, (loader_states, rng_json, {k: v.cpu() for k, v in rng_tensors.items()}))
        if not self.world.main:
            return
        config = {"model": self.model_config.to_dict(),
                  "train": {k: v for k, v in self.cfg.to_dict().items() if k != "model"},
                  "step": self.step, "tokenizer_checksum": self.tokenizer.checksum}
        state = {"step": self.step, "best_val_loss": self.best_val, "world_size": self.world.world_size,
                 "grad_accum": self.cfg.grad_accum, "data_seed": self.data_seed, "elapsed_s": self._elapsed(),
                 "grad_scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps,
                 "early_stopping": self.early_stop.state_dict(),
                 "planned_iters": self.cfg.max_iters if self.budget is not None and self.budget.planned else None,
                 "loaders": [s for states, _, _ in gathered for s in states],
                 "rng": [j for _, j, _ in gathered]}
        tensors = {f"rng.{r}.{k}": v for r, (_, _, ts) in enumerate(gathered) for k, v in ts.items()}
        save_checkpoint(self.out, self.model, self.tokenizer, config, self.optimizer, state, tensors)
        if best:
            save_checkpoint(self.out / BEST_DIR, self.model, self.tokenizer, config)

    def _elapsed(self) -> float:
        """Seconds since the run started, --resume's processes included (from the checkpoint's state)."""
        return round(time.perf_counter() - self.started, 3)

    def _log(self, record: dict[str, Any]) -> None:
        record["elapsed_s"] = self._elapsed()
        self.records.append(record)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _precision(amp_dtype: torch.dtype | None) -> str:
    if amp_dtype is None:
        return "float32"
    return "float16 autocast with loss scaling" if amp_dtype == torch.float16 else "bfloat16 autocast"


def loader_rank(rank: int, micro_step: int, grad_accum: int) -> int:
    """The data shard of (process `rank`, micro-step): shards are numbered process-major."""
    return rank * grad_accum + micro_step


def resume_command(out: Path) -> str:
    """The shell command that continues the run in `out`: torchrun's when this run is one of its jobs."""
    launcher = "python"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        nodes = int(os.environ["WORLD_SIZE"]) // per_node
        launcher = "torchrun" + (f" --nnodes={nodes}" if nodes > 1 else "") + f" --nproc_per_node={per_node}"
    return f"{launcher} train.py --resume --out-dir {shlex.quote(str(out))}"


def _check_same_model(saved: dict[str, Any], wanted: GPTConfig, out: Path) -> None:
    """--resume must rebuild the very network that was saved (dropout may change: it is not part of the shape;
    the vocabulary comes from the tokenizer, checked by _check_same_tokenizer once it is loaded)."""
    have = GPTConfig.from_dict(saved["model"]).to_dict()
    differ = [f"{k}={have[k]!r} (asked: {v!r})" for k, v in wanted.to_dict().items()
              if k not in ("dropout", "vocab_size") and have[k] != v]
    if differ:
        raise CheckpointError(f"the checkpoint in {out} has a different model: {', '.join(differ)}; resume with "
                              f"the same model settings, or train a new model in another --out-dir")


def _check_same_tokenizer(saved: dict[str, Any], wanted: GPTConfig, tokenizer_checksum: str, out: Path) -> None:
    """The tokenizer in use must be the checkpoint's: the same vocabulary, and the same checksum when recorded."""
    if saved["model"]["vocab_size"] != wanted.vocab_size:
        raise CheckpointError(f"the checkpoint in {out} has a vocabulary of {saved['model']['vocab_size']} tokens, "
                              f"the tokenizer in use {wanted.vocab_size}; resume without --tokenizer")
    if saved.get("tokenizer_checksum") not in (None, tokenizer_checksum):
        raise CheckpointError(f"the tokenizer in use differs from the one the checkpoint in {out} was trained with; "
                              f"resume without --tokenizer")


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
