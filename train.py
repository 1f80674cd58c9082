"""Train a GPT from a text corpus: `python train.py` runs the offline default corpus end to end on a CPU.

Every field of TrainConfig and GPTConfig is a flag (`--n-layer 6`, `--compile/--no-compile`); `--config FILE`
(TOML or JSON: keys named like the fields, flat or in [model] / [train] tables, as in a checkpoint's config.json)
sets values that flags then override. With `--resume`, settings not given again are those the checkpoint was
trained with. Several processes: `torchrun --nproc_per_node=K train.py ...`.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from minigpt.config import CHOICES, OPEN_CHOICES, GPTConfig, TrainConfig, expand_path
from minigpt.errors import ConfigError, run_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML needs 3.11's tomllib; JSON files still work
    tomllib = None

# The model's vocabulary size comes from the tokenizer (--vocab-size sets the tokenizer's).
DERIVED_MODEL_FIELDS = ("vocab_size",)
# What --resume does not take from the checkpoint: where and how this run happens, not what it trains.
MACHINE_SETTINGS = ("out_dir", "resume", "overwrite", "device", "attention", "dtype", "compile", "progress",
                    "peak_tflops", "prepare_only")
# What --config does not take from a checkpoint's config.json: a new run goes elsewhere, on its own.
RUN_CONTROL = ("out_dir", "resume", "overwrite")
# What sets the tokenizer that is trained on the data (or names the one to use instead).
TOKENIZER_SETTINGS = ("tokenizer", "vocab_size", "pattern")
# Settings that only shape what another setting turns on: asked for without it, they would do nothing, so they
# are refused. name: (what it shapes, whether this config reads it, what the config has instead, what turns it on).
SHAPES_ONLY = {
    "decay_fraction": ("--lr-schedule wsd (its last fraction of steps decays)", lambda c: c.lr_schedule == "wsd",
                       lambda c: f"the schedule here is {c.lr_schedule}", "--lr-schedule wsd"),
    "min_lr": ("a schedule that decays (cosine, linear, wsd)", lambda c: c.lr_schedule != "constant",
               lambda c: "the schedule here is constant", "--lr-schedule cosine|linear|wsd"),
    "lr_decay_iters": ("a schedule that decays (cosine, linear, wsd)", lambda c: c.lr_schedule != "constant",
                       lambda c: "the schedule here is constant", "--lr-schedule cosine|linear|wsd"),
    "min_delta": ("early stopping (what counts as a better validation loss)", lambda c: c.patience is not None,
                  lambda c: "early stopping is off", "--patience N"),
    "muon_lr": ("--optimizer muon (the rate of the blocks' matrices)", lambda c: c.optimizer == "muon",
                lambda c: f"the optimizer here is {c.optimizer}", "--optimizer muon"),
    "activation": ("--mlp gelu (the exact or tanh GELU of its 4x MLP)", lambda c: c.model.mlp == "gelu",
                   lambda c: f"the MLP here is {c.model.mlp}", "--mlp gelu"),
}
# What a checkpoint's config.json holds beside the settings.
CHECKPOINT_KEYS = ("format", "version", "step", "tokenizer_checksum")


def _settable_fields() -> list[tuple[type, Any]]:
    """(owner, field) for every flag: TrainConfig's fields, then GPTConfig's, with the nested `model` left out."""
    model_fields = [(GPTConfig, f) for f in fields(GPTConfig) if f.name not in DERIVED_MODEL_FIELDS]
    return [(TrainConfig, f) for f in fields(TrainConfig) if f.name != "model"] + model_fields


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ConfigError: one line on stderr, like every other user error."""

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [s for a in self._actions for s in a.option_strings]
        hints = [f"did you mean {close[0]}?" for arg in unknown
                 if (close := difflib.get_close_matches(arg.split("=")[0], flags, n=1))]
        raise ConfigError(f"{message}{' (' + '; '.join(hints) + ')' if hints else ''} "
                          f"(see `python train.py --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)  # only flags given on the command line
    parser.add_argument("--config", metavar="FILE", type=expand_path,
                        help="TOML or JSON file of settings, or a checkpoint's config.json (flags override it)")
    defaults = TrainConfig()
    for owner, f in _settable_fields():
        hint = get_type_hints(owner)[f.name]
        kind = next((t for t in get_args(hint) if t is not type(None)), hint)
        default = getattr(defaults.model if owner is GPTConfig else defaults, f.name)
        help_text = f.metadata.get("help", f"model setting {f.name}")
        if f.name in CHOICES:
            extra = f", or {OPEN_CHOICES[f.name]}" if f.name in OPEN_CHOICES else ""
            help_text += f"; one of {', '.join(CHOICES[f.name])}{extra}"
        if "default" not in help_text:
            help_text += f" (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, metavar=kind.__name__.upper(), help=help_text)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a .toml or .json file: flat keys (- or _), or [model] / [train] tables, as in a checkpoint's
    config.json (whose location and run-control settings are left out: a new run goes elsewhere)."""
    return _read_settings_file(path)[0]


def _read_settings_file(path: str) -> tuple[dict[str, Any], bool]:
    """read_config_file's settings, and whether the file is a checkpoint's config.json (which records every
    setting, asked for or not)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if file.suffix != ".json" and tomllib is None:
        raise ConfigError(f"reading TOML ({path}) needs Python 3.11 or newer; write the settings as JSON instead")
    try:
        values = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path} is not valid {'JSON' if file.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    from_checkpoint = "format" in values and isinstance(values.get("model"), dict)
    flat = {}
    for table in ("model", "train"):
        section = values.pop(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{table}] in config file {path} must be a table of settings")
        if table == "model" and "vocab_size" in section:  # the model's vocabulary is the tokenizer's
            section = dict(section)
            flat.setdefault("vocab_size", section.pop("vocab_size"))
        flat.update(section)
    if from_checkpoint:
        values = {k: v for k, v in values.items() if k not in CHECKPOINT_KEYS}
        flat = {k: v for k, v in flat.items() if k not in RUN_CONTROL}
        if flat.get("init_from"):  # a finetune's tokenizer came with its pretrained model: no settings of its own
            flat = {k: v for k, v in flat.items() if k not in TOKENIZER_SETTINGS}
    flat.update(values)
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    known = [f.name for _, f in _settable_fields()]
    unknown = sorted(set(flat) - set(known))
    if unknown:
        named = [k + "".join(f" (did you mean {c}?)" for c in difflib.get_close_matches(k, known, n=1))
                 for k in unknown]
        raise ConfigError(f"unknown setting(s) {', '.join(named)} in {path}; see `python train.py --help`")
    return flat, from_checkpoint


def make_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < the checkpoint's settings (with --resume) < --config file < flags."""
    parser = build_parser()
    given = vars(parser.parse_args(_attach_dash_values(parser, sys.argv[1:] if argv is None else argv)))
    config_file = given.pop("config", None)
    values, from_checkpoint = _read_settings_file(config_file) if config_file else ({}, False)
    asked = set(given) | (set() if from_checkpoint else set(values))  # what this command sets on purpose
    values.update(given)
    _say_what_is_ignored(values)
    if values.get("resume"):
        out_dir = values.get("out_dir", TrainConfig().out_dir)
        saved = _checkpoint_settings(out_dir)
        if "init_from" in values:
            _check_same_start(values["init_from"], saved.get("init_from"), out_dir)
        if "seed" in values and values["seed"] != saved.get("seed", values["seed"]):
            raise ConfigError(f"--seed {values['seed']} contradicts the checkpoint in {out_dir}, trained with --seed "
                              f"{saved['seed']}: --resume continues the random streams saved there (dropout, batches), "
                              f"so it would change only the record; leave --seed out, or start a new run in another "
                              f"--out-dir")
        values = {**saved, **values}
    if "grad_accum" in asked and values.get("total_batch_tokens") is not None:  # (a checkpoint records both)
        where = "" if "grad_accum" in given else f" (in {config_file})"
        raise ConfigError(f"--grad-accum {values['grad_accum']}{where} contradicts --total-batch-tokens "
                          f"{values['total_batch_tokens']} (from the flags, the config file or the checkpoint), which "
                          f"sets grad_accum; give --total-batch-tokens alone")
    model_names = {f.name for f in fields(GPTConfig)} - set(DERIVED_MODEL_FIELDS)
    model = {k: v for k, v in values.items() if k in model_names}
    train = {k: v for k, v in values.items() if k not in model_names}
    if train.get("init_from") and not train.get("resume"):
        cfg = TrainConfig(model=_pretrained_model(train, model), **train)
    else:
        cfg = TrainConfig(model=GPTConfig(**{**TrainConfig().model.to_dict(), **model}), **train)
    for name, (what, read, here, turn_on) in SHAPES_ONLY.items():
        if name in asked and values[name] is not None and not read(cfg):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} shapes only {what}; {here(cfg)}: add {turn_on}, or leave {flag} out")
    return cfg


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--max-time -5s` as `--max-time=-5s`: argparse takes a value that starts with "-" for a flag (and stops
    at "expected one argument"); attached, it reaches the setting's own check, which says what is wrong."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    known = {s for a in parser._actions for s in a.option_strings}
    out, k = [], 0
    while k < len(argv):
        if argv[k] in takes_value and k + 1 < len(argv) and argv[k + 1].startswith("-") and \
                argv[k + 1].split("=")[0] not in known:
            out.append(f"{argv[k]}={argv[k + 1]}")
            k += 2
        else:
            out.append(argv[k])
            k += 1
    return out


def _say_what_is_ignored(values: dict[str, Any]) -> None:
    """The tokenizer's training settings do nothing when the tokenizer is given (or, on --resume, the
    checkpoint's): say so rather than let a --vocab-size pass without effect."""
    source = ("--tokenizer " + shlex.quote(str(values["tokenizer"])) if values.get("tokenizer") else
              "the checkpoint's tokenizer (--resume)" if values.get("resume") else None)
    ignored = [f"--{k.replace('_', '-')}" for k in ("vocab_size", "pattern") if k in values]
    if not (source and ignored):
        return
    from minigpt.distributed import Dist  # imports torch: only when there is something to say

    if Dist.from_env().main:
        print(f"note: {' and '.join(ignored)} ignored: the vocabulary comes from {source}", file=sys.stderr)


def _pretrained_model(train: dict[str, Any], model: dict[str, Any]) -> GPTConfig:
    """--init-from: the pretrained model's shape, with the few settings a finetune may change (a shorter
    --block-size, --dropout); other model flags must agree with it, and it brings its own tokenizer."""
    for name in TOKENIZER_SETTINGS:
        if name in train:
            raise ConfigError(f"--{name.replace('_', '-')} contradicts --init-from, which brings its own tokenizer; "
                              f"leave it out")
    from minigpt.hf import pretrained_config  # imports torch: only when finetuning

    return pretrained_config(expand_path(train["init_from"]), model)


def _check_same_start(given: str | None, saved: str | None, out_dir: str) -> None:
    """--resume continues the checkpoint's model: an --init-from other than the one it was finetuned from (or one
    for a run trained from scratch) would only be recorded, wrongly, as where the model came from."""
    def where(value: str | None) -> str | None:  # as the checkpoint records it: resolved where it is a folder
        value = expand_path(value) if value else None
        return os.path.abspath(value) if value and Path(value).exists() else value

    if where(given) != where(saved):
        started = f"was finetuned from {saved}" if saved else "was trained from scratch"
        raise ConfigError(f"--init-from {given!r} contradicts the checkpoint in {out_dir}, which {started}; --resume "
                          f"continues that model: leave --init-from out, or start a new run in another --out-dir")


def _checkpoint_settings(out_dir: str) -> dict[str, Any]:
    """The settings a checkpoint was trained with (its location and run-control flags excluded)."""
    from minigpt.trainer import read_resume_config  # imports torch: only when resuming

    saved = read_resume_config(out_dir)
    settings = {k: v for k, v in saved.get("train", {}).items()
                if k in TrainConfig.__dataclass_fields__ and k not in MACHINE_SETTINGS}
    settings.update({k: v for k, v in saved["model"].items() if k not in DERIVED_MODEL_FIELDS})
    return settings


def main() -> int:
    cfg = make_config()
    from minigpt.distributed import Dist  # torch is imported only once the settings are valid
    from minigpt.trainer import next_step_hint, train

    out = train(cfg)
    if not Dist.from_env().main:
        return 0
    if cfg.prepare_only:
        print("train on these tokens with the same data settings (and --data-dir), without --prepare-only")
    else:
        print(f"\ncheckpoint: {out}/ (best validation loss: {out}/best/)\n"
              f"sample from it: python sample.py --out-dir {shlex.quote(str(out))}\n"
              f"train it further: {next_step_hint(out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
