"""Checkpoints on disk: safetensors + JSON, no pickle, and never left half-written.

A checkpoint folder holds
    model.safetensors        the weights (a tied output head is stored once and re-tied on load)
    config.json              {"format", "version", "model": GPTConfig, "train": TrainConfig, "step", ...}
    tokenizer.json           the tokenizer the model was trained with
    train_state.safetensors  optimizer moments and RNG generator states (tensors)     } only in a resumable
    train_state.json         step, optimizer hyper-parameters, RNG and loader state,  }   (latest) checkpoint
                             float16 loss scaler, early-stopping counter, the step    }
                             count a time budget chose                                }
    manifest.json            size and SHA-256 of each file above; written last

Why a manifest and a hard-linked backup. Each file is replaced atomically (os.replace), but a checkpoint is
several files, and a kill between two replaces would leave new weights next to an old optimizer state. So a
save (1) writes every new file into a fresh temporary folder, (2) hard-links the current, verified checkpoint
into `.previous/` (a rename makes that backup appear all at once; hard links cost no copy), (3) moves the new
files into place with os.replace, the manifest last, and (4) deletes the backup. The loader checks the files
against the manifest: a kill during (3) leaves files that disagree with it, and the loader falls back to
`.previous/`, which is complete. At every moment one complete checkpoint can be found. A directory-pointer
swap (one symlink) would be shorter, but symlinks are not portable and would hide the files users expect at
`out/model.safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_weights

from tokenizer import Tokenizer, TokenizerError

from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .model import GPT

FORMAT = "minigpt-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
BACKUP_DIR = ".previous"
BEST_DIR = "best"  # the trainer's copy of the model with the lowest validation loss (weights only)
MODEL_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE)
RESUME_FILES = MODEL_FILES + (STATE_TENSORS_FILE, STATE_JSON_FILE)

__all__ = ["CheckpointError", "save_checkpoint", "load_model", "read_config", "load_train_state", "read_train_state",
           "has_checkpoint", "checkpoint_dir", "rng_state", "set_rng_state"]


# ----------------------------------------------------------------------------------------------- saving
def save_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    state_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint into `directory` (created if needed) without ever exposing a partial one.

    `config` goes to config.json. With an `optimizer`, the training state is written too: its tensors and
    `state_tensors` (e.g. RNG states) to train_state.safetensors, and `state` (JSON-able: step, loader...) to
    train_state.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(".incoming-*"):  # a save that was killed (SIGKILL, OOM) left it behind
        shutil.rmtree(leftover, ignore_errors=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=directory))
    try:
        save_model(model, str(incoming / MODEL_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
        _write_json(incoming / CONFIG_FILE, {"format": FORMAT, "version": VERSION, **config})
        tokenizer.save(incoming / TOKENIZER_FILE)
        if optimizer is not None:
            opt_tensors, opt_json = _flatten_optimizer(optimizer)
            save_file({**opt_tensors, **(state_tensors or {})}, str(incoming / STATE_TENSORS_FILE))
            _write_json(incoming / STATE_JSON_FILE, {"optimizer": opt_json, **(state or {})})
        names = sorted(p.name for p in incoming.iterdir())
        for name in names:
            os.chmod(incoming / name, 0o644)  # temp-file helpers create 0600 files; a checkpoint is for sharing
            _fsync(incoming / name)
        manifest = {"format": FORMAT, "version": VERSION,
                    "files": {name: _file_entry(incoming / name) for name in names}}
        _write_json(incoming / MANIFEST_FILE, manifest)
        _fsync(incoming / MANIFEST_FILE)

        _backup_current(directory)
        for name in names + [MANIFEST_FILE]:
            os.replace(incoming / name, directory / name)
        if optimizer is None:  # a weights-only save must not leave an older run's state looking current
            for name in (STATE_TENSORS_FILE, STATE_JSON_FILE):
                (directory / name).unlink(missing_ok=True)
        _fsync_dir(directory)
        shutil.rmtree(directory / BACKUP_DIR, ignore_errors=True)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return directory


def _backup_current(directory: Path) -> None:
    """Hard-link the current checkpoint into BACKUP_DIR, unless it is incomplete (then keep the older backup)."""
    try:
        files = _verified_files(directory, ())
    except CheckpointError:
        return  # nothing complete here: either a first save, or the backup already holds the last good one
    staging = directory / (BACKUP_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in list(files) + [MANIFEST_FILE]:
        try:
            os.link(directory / name, staging / name)
        except OSError:  # a file system without hard links
            shutil.copy2(directory / name, staging / name)
    shutil.rmtree(directory / BACKUP_DIR, ignore_errors=True)
    os.replace(staging, directory / BACKUP_DIR)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable across a power cut (POSIX only; Windows cannot open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- loading
def has_checkpoint(directory: str | Path) -> bool:
    """True when `directory` holds a checkpoint, complete or not (used to refuse overwriting one)."""
    directory = Path(directory)
    return (directory / MANIFEST_FILE).exists() or (directory / BACKUP_DIR / MANIFEST_FILE).exists()


def foreign_files(directory: str | Path) -> list[str]:
    """The files in `directory` that a save would replace although no minigpt run wrote them (a Hugging Face model
    folder, downloaded or exported, holds a config.json, model.safetensors and tokenizer.json too); none when it
    holds a checkpoint, or a save that was cut short (its config.json, written first, is ours)."""
    directory = Path(directory)
    present = [name for name in RESUME_FILES if (directory / name).exists()]
    if not present or has_checkpoint(directory):
        return []
    try:
        ours = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    return [] if ours else present


def checkpoint_dir(directory: str | Path, needed: tuple[str, ...] = MODEL_FILES) -> Path:
    """The folder holding a complete copy of the checkpoint in `directory`: itself, or its backup after a
    save that was killed half-way. Raises CheckpointError saying what is missing or corrupt."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint folder {directory}; train one with "
                              f"`python train.py --out-dir {shlex.quote(str(directory))}`")
    try:
        _verified_files(directory, needed)
        return directory
    except CheckpointError as error:
        backup = directory / BACKUP_DIR
        try:
            _verified_files(backup, needed)
        except CheckpointError:
            raise error from None
        print(f"warning: the last save to {directory} was interrupted; using the previous checkpoint in {backup}",
              file=sys.stderr)
        return backup


def _verified_files(directory: Path, needed: tuple[str, ...]) -> dict[str, Any]:
    """The manifest's file table after checking that every listed file has the recorded size and hash."""
    manifest = _read_json(directory / MANIFEST_FILE)
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{directory / MANIFEST_FILE} is not a minigpt checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{directory} has checkpoint format version {manifest.get('version')}; "
                              f"this minigpt reads version {VERSION}")
    for name in needed:
        if name not in files:
            raise CheckpointError(f"{directory} has no {name} (a best/ checkpoint cannot be resumed)")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} is truncated or corrupt (it does not match {MANIFEST_FILE})")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {path.parent} a checkpoint folder written by train.py?")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is corrupt")
    return value


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of the checkpoint in `directory` (verified), with "model" checked to be a valid GPTConfig."""
    folder = checkpoint_dir(directory)
    config = _read_json(folder / CONFIG_FILE)
    if config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a minigpt checkpoint config")
    try:
        GPTConfig.from_dict(config["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} holds an invalid model config: {exc}") from None
    return config


def load_model(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The trained model (in eval mode, on `device`), its tokenizer, and the checkpoint's config dict."""
    folder = checkpoint_dir(out_dir)
    config = read_config(folder)
    model_config = GPTConfig.from_dict(config["model"])
    try:
        tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    except (TokenizerError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / TOKENIZER_FILE} cannot be read: {exc}") from None
    if tokenizer.vocab_size > model_config.vocab_size:  # fewer is fine: a pretrained vocabulary may be padded
        raise CheckpointError(f"{folder / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model in "
                              f"{folder} has only {model_config.vocab_size}; the two files do not belong together")
    model = GPT(model_config)
    _load_weights_into(model, folder / MODEL_FILE)
    return model.to(device).eval(), tokenizer, config


def _load_weights_into(model: torch.nn.Module, path: Path) -> None:
    try:
        load_weights(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not fit the model in {CONFIG_FILE}: {first_line}") from None


def read_train_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """train_state.json of the resumable checkpoint in `directory`, and its tensors other than the optimizer's
    (which are left on disk): what a resume decides from before it builds the model."""
    folder = checkpoint_dir(directory, RESUME_FILES)
    state = _read_json(folder / STATE_JSON_FILE)
    try:
        with safe_open(str(folder / STATE_TENSORS_FILE), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"the training state in {folder} cannot be read ({exc}); start a new run in "
                              f"another --out-dir") from None
    return state, tensors


def load_train_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and the optimizer's state of a resumable checkpoint in place (the rest of the training
    state is read_train_state's)."""
    folder = checkpoint_dir(directory, RESUME_FILES)
    _load_weights_into(model, folder / MODEL_FILE)
    state = _read_json(folder / STATE_JSON_FILE)
    try:
        tensors = load_file(str(folder / STATE_TENSORS_FILE))
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the training state in {folder} cannot be restored ({exc}); "
                              f"start a new run in another --out-dir") from None


# ------------------------------------------------------------------------------ optimizer and RNG state
def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() split into named tensors (for safetensors) and everything else (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every random generator a training step can touch: Python and NumPy (JSON), torch CPU/CUDA (tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {"python": [version, list(internal), gauss],
               "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return as_json, tensors


def set_rng_state(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Undo `rng_state`: the generators continue exactly where they were."""
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
