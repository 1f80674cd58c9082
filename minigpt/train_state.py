"""The resume contract: what a checkpoint holds beyond the weights and the optimizer's moments so that a resumed run
goes on exactly where it stopped, as one versioned dataclass; and the checks that a resume continues the same run.

`TrainState.capture` takes it from a running trainer, `apply` puts it back into a new one. It is stored as
train_state.json (beside the optimizer's own JSON, which checkpoint.save_checkpoint writes) and, for each rank's
torch RNG states, tensors `rng.<rank>.<name>` in train_state.safetensors.

Versions: 1 (no "version" key) lacked best_step, precision and prepared_data; it is read as version 1 and
migrated: best_step from best/config.json, precision from the dtype setting (float16 when a loss scaler was
saved), no prepared-data folder. 2 adds those three.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data.errors import DataError
from data.prepare import META_FILE, PreparedData, corpus_key, load_prepared

from .checkpoint import BEST_DIR, read_config, read_train_state, set_rng_state
from .config import GPTConfig
from .device import autocast_dtype
from .errors import CheckpointError, ConfigError
from .stopping import EarlyStopping

if TYPE_CHECKING:
    from .trainer import _Run

VERSION = 2
PRECISIONS = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # autocast dtype → name


@dataclass
class TrainState:
    """Everything a resume restores besides weights and optimizer moments (train_state.json, version 2)."""

    step: int
    best_val_loss: float  # of the model in best/ (inf: none saved yet)
    best_step: int | None  # and its step
    elapsed_s: float  # the run's time so far, over every process that worked on it
    world_size: int  # the data layout the loaders and RNG streams belong to: processes...
    grad_accum: int  # ... × micro-batches
    data_seed: int | None  # the seed the loaders were built with (None: the seed setting)
    precision: str | None  # float32, bfloat16 or float16: the autocast dtype it trained in (None: unknown)
    grad_scaler: dict[str, Any]  # float16's loss scaler ({}: never used), kept through runs in other precisions
    skipped_steps: int  # float16 steps skipped for overflowing gradients
    early_stopping: dict[str, Any] | None  # EarlyStopping.state_dict()
    planned_iters: int | None  # the step count a time budget fixed (None: none fixed)
    prepared_data: str | None  # the prepared-data folder it trained on (for a resume whose corpus is gone)
    loaders: list[dict[str, Any]]  # one per data shard, process-major (trainer.loader_rank)
    rng: list[dict[str, Any]]  # per rank: the Python and NumPy generators
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # rng.<rank>.<name>
    version: int = VERSION

    # --------------------------------------------------------------------------------------------- files
    def to_files(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(train_state.json's content, tensors for train_state.safetensors)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rng_tensors"}
        return values, self.rng_tensors

    @classmethod
    def from_files(cls, values: dict[str, Any], tensors: dict[str, torch.Tensor], settings: dict[str, Any],
                   best_dir: Path | None = None) -> TrainState:
        """Read train_state.json's content (any version), migrating an older one; `settings` is config.json's
        "train" (version 1 kept the precision there), `best_dir` the best/ folder (its step, for version 1)."""
        version = values.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"the training state has version {version}; this minigpt reads versions 1 to "
                                  f"{VERSION}: update minigpt to resume it")
        values = dict(values)
        if version == 1:
            values.update(_from_version_1(values, settings, best_dir))
        known = {f.name for f in fields(cls)} - {"rng_tensors", "version"}
        try:
            return cls(**{k: v for k, v in values.items() if k in known}, rng_tensors=tensors)
        except TypeError as exc:
            raise CheckpointError(f"the training state is incomplete ({exc}); start a new run in another "
                                  f"--out-dir") from None

    @classmethod
    def read(cls, out: Path) -> TrainState:
        """The training state of the resumable checkpoint in `out` (verified), migrated to this version."""
        values, tensors = read_train_state(out)
        return cls.from_files(values, tensors, read_config(out).get("train", {}), out / BEST_DIR)

    # ------------------------------------------------------------------------------------ capture, apply
    @classmethod
    def capture(cls, run: _Run, per_rank: list[tuple[list[dict], dict, dict[str, torch.Tensor]]]) -> TrainState:
        """The state of `run`, with `per_rank` each rank's (loader states, RNG JSON, RNG tensors) in rank order."""
        scaler = run.scaler.state_dict() if run.scaler.is_enabled() else run.kept_scaler
        return cls(step=run.step, best_val_loss=run.best_val, best_step=run.best_step, elapsed_s=run.elapsed(),
                   world_size=run.world.world_size, grad_accum=run.cfg.grad_accum, data_seed=run.data_seed,
                   precision=PRECISIONS[run.amp_dtype], grad_scaler=scaler, skipped_steps=run.skipped_steps,
                   early_stopping=run.early_stop.state_dict(),
                   planned_iters=run.schedule.max_iters if run.budget is not None and run.budget.planned else None,
                   prepared_data=str(Path(run.data.dir).resolve()),
                   loaders=[s for loaders, _, _ in per_rank for s in loaders], rng=[j for _, j, _ in per_rank],
                   rng_tensors={f"rng.{r}.{k}": v for r, (_, _, ts) in enumerate(per_rank) for k, v in ts.items()})

    def early_stopping_under(self, patience: int | None, min_delta: float = 0.0) -> EarlyStopping:
        """The saved early-stopping counter under `patience` (a resume may give a larger one)."""
        stopper = EarlyStopping(patience, min_delta)
        if self.early_stopping is not None:
            stopper.load_state_dict(self.early_stopping)
        return stopper

    def prepared_tokens(self, checksum: str | None, data_dir: Path) -> PreparedData | None:
        """The tokens this run trained on, made by the tokenizer with `checksum`, for a resume whose corpus is
        gone: the folder recorded, or one of its name in `data_dir` (the run was moved), or (a version 1 state
        recorded none) the only one in `data_dir` that the tokenizer made. None when there is no such folder."""
        if checksum is None:
            return None
        recorded = self.prepared_data
        candidates = [Path(recorded), data_dir / Path(recorded).name] if recorded else []
        if not candidates:
            made_by = [meta.parent for meta in sorted(data_dir.glob(f"*/{META_FILE}")) if _made_by(meta, checksum)]
            candidates = made_by if len(made_by) == 1 else []
        for folder in candidates:
            with contextlib.suppress(DataError, OSError, ValueError):
                return load_prepared(folder, expected_checksum=checksum)
        return None

    def data_change(self, data: PreparedData) -> str | None:
        """A note for a resume that trains on other tokens than the checkpoint did, prepared afresh because the corpus
        or the data settings changed (None: the same tokens, or unknown to a version 1 state). It goes on, as
        nanoGPT's resume trains on whatever train.bin holds now (a corpus that grew is a reason to resume), but says
        what changed: the batches, and the validation split that every earlier evaluation was made on."""
        if self.prepared_data is None or corpus_key(self.prepared_data) == corpus_key(data.dir):
            return None
        then = ""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            tokens = json.loads((Path(self.prepared_data) / META_FILE).read_text(encoding="utf-8"))["tokens"]
            then = f" ({tokens['train']:,} train + {tokens['val']:,} val tokens)"
        return (f"note: the corpus or the data settings changed since the checkpoint, which trained on "
                f"{self.prepared_data}{then}; this run goes on with the tokens prepared now in {data.dir} "
                f"({len(data.train_tokens):,} + {len(data.val_tokens):,}), and its validation split is new: losses "
                f"from here are not comparable with the earlier evaluations, which best/ and --patience compare them "
                f"with")

    def same_layout(self, world_size: int, grad_accum: int) -> bool:
        """Whether the saved loaders and RNG streams are those of `world_size` processes × `grad_accum`."""
        return (self.world_size, self.grad_accum) == (world_size, grad_accum)

    def apply(self, run: _Run) -> None:
        """Put this state back into `run` (its model and optimizer are loaded apart): counters, clocks, the loss
        scaler, early stopping, the planned step count, and this rank's RNG streams and data positions when the
        data layout is the same; with another layout the batches cannot be replayed, and fresh ones are drawn
        (not those of step 0 again)."""
        cfg, rank = run.cfg, run.world.rank
        run.step, run.best_val, run.best_step = self.step, self.best_val_loss, self.best_step
        run.started -= self.elapsed_s  # elapsed_s counts the whole run, not this process's part
        run.skipped_steps = self.skipped_steps
        if run.scaler.is_enabled():
            if self.grad_scaler:
                run.scaler.load_state_dict(self.grad_scaler)
        else:
            run.kept_scaler = self.grad_scaler  # saved again as it is, for a later resume in float16
        if self.early_stopping is not None:
            run.early_stop.load_state_dict(self.early_stopping)
        if run.budget is not None and self.planned_iters is not None:
            run.budget.planned = True  # the step count is the settings' max_iters (train.py takes the checkpoint's)
        if self.same_layout(run.world.world_size, cfg.grad_accum):
            prefix = f"rng.{rank}."
            set_rng_state(self.rng[rank], {k[len(prefix):]: v for k, v in self.rng_tensors.items()
                                           if k.startswith(prefix)})
            run.loaders = run.make_loaders(cfg.seed if self.data_seed is None else self.data_seed)
            for loader, state in zip(run.loaders, self.loaders[rank * cfg.grad_accum:]):
                loader.load_state_dict(state)
        else:
            then, now = self.world_size * self.grad_accum, run.world.world_size * cfg.grad_accum
            size = "" if then == now else (
                f", and a step takes {now / then:g}x the sequences it took ({run.tokens_per_step:,} tokens now; "
                f"--total-batch-tokens keeps a step's size on any number of processes)")
            run.say(f"note: the checkpoint was written by {self.world_size} process(es) × grad_accum "
                    f"{self.grad_accum}, this run is {run.world.world_size} × {cfg.grad_accum}; data order restarts "
                    f"from a new seed{size}")
            torch.manual_seed(cfg.seed + rank + 7919 * self.step)
            run.loaders = run.make_loaders(cfg.seed + self.step)


def _from_version_1(values: dict[str, Any], settings: dict[str, Any], best_dir: Path | None) -> dict[str, Any]:
    """What version 1 lacked, as it behaved: the best step is best/'s, float16 is known by its scaler."""
    best_step = None
    if best_dir is not None and math.isfinite(values.get("best_val_loss", math.inf)):
        try:
            best_step = read_config(best_dir).get("step")
        except CheckpointError:
            pass
    dtype = settings.get("dtype", "auto")
    precision = dtype if dtype != "auto" else "float16" if values.get("grad_scaler") else None
    return {"best_step": best_step, "precision": precision, "prepared_data": None,
            "elapsed_s": values.get("elapsed_s", 0.0), "skipped_steps": values.get("skipped_steps", 0),
            "grad_scaler": values.get("grad_scaler") or {}, "early_stopping": values.get("early_stopping"),
            "planned_iters": values.get("planned_iters"), "data_seed": values.get("data_seed")}


def _made_by(meta: Path, checksum: str) -> bool:
    """Whether the prepared-data header `meta` names the tokenizer with `checksum`."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(meta.read_text(encoding="utf-8")).get("tokenizer_checksum") == checksum
    return False


# ------------------------------------------------------------------------------------------------ checks
def check_same_run(saved: dict[str, Any], wanted: GPTConfig, optimizer: str, out: Path) -> None:
    """--resume must rebuild the very network that was saved (dropout may change: it is not part of the shape;
    the vocabulary comes from the tokenizer, see check_same_tokenizer), with the same kind of optimizer."""
    have = GPTConfig.from_dict(saved["model"]).to_dict()
    differ = [f"{k}={have[k]!r} (asked: {v!r})" for k, v in wanted.to_dict().items()
              if k not in ("dropout", "vocab_size") and have[k] != v]
    if differ:
        raise CheckpointError(f"the checkpoint in {out} has a different model: {', '.join(differ)}; resume with "
                              f"the same model settings, or train a new model in another --out-dir")
    saved_optimizer = saved.get("train", {}).get("optimizer", "adamw")
    if saved_optimizer != optimizer:
        raise CheckpointError(f"the checkpoint in {out} was trained with --optimizer {saved_optimizer}; "
                              f"resume with it, or train a new model in another --out-dir")


def check_same_tokenizer(saved: dict[str, Any], wanted: GPTConfig, tokenizer_checksum: str, out: Path) -> None:
    """The tokenizer in use must be the checkpoint's: the same vocabulary, and the same checksum when recorded."""
    if saved["model"]["vocab_size"] != wanted.vocab_size:
        raise CheckpointError(f"the checkpoint in {out} has a vocabulary of {saved['model']['vocab_size']} tokens, "
                              f"the tokenizer in use {wanted.vocab_size}; resume without --tokenizer")
    if saved.get("tokenizer_checksum") not in (None, tokenizer_checksum):
        raise CheckpointError(f"the tokenizer in use differs from the one the checkpoint in {out} was trained with; "
                              f"resume without --tokenizer")


def resume_precision(dtype: str, saved: str | None, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype of a resumed run, and a note when it is not the one the checkpoint trained in.

    --dtype auto (the default) continues in the checkpoint's precision where `device` can autocast to it, and
    otherwise in the device's own default; a --dtype that is given is used as given. Either way a change is said,
    and float16's loss scaler is kept in the checkpoint for a later float16 resume.
    """
    why = "as --dtype says"
    if dtype == "auto" and saved is not None:
        try:
            return autocast_dtype(saved, device), None
        except ConfigError:
            why = f"{device} cannot autocast to {saved}"
    chosen = autocast_dtype(dtype, device)
    if saved is None or PRECISIONS[chosen] == saved:
        return chosen, None
    kept = "; its float16 loss scaler is kept for a later float16 resume" if saved == "float16" else ""
    return chosen, (f"note: the checkpoint was trained in {saved}; this run continues in {PRECISIONS[chosen]} "
                    f"({why}){kept}")
