"""The presets in configs/ are what `train.py --config` reads: every key is a known setting, flags still override
them, and each trains, made tiny by flags, with the rest of its settings as it has them."""
import json
from dataclasses import fields
from pathlib import Path

import pytest

import train as train_cli
from minigpt.checkpoint import read_config
from minigpt.config import GPTConfig, TrainConfig
from minigpt.trainer import train

from helpers import records, write_corpus

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def setting(config: TrainConfig, name: str):
    """A setting of TrainConfig or of its model, by name."""
    return getattr(config.model if hasattr(config.model, name) else config, name)


def test_the_modern_preset_sets_its_switches_and_flags_override_them(tmp_path):
    modern = Path(__file__).resolve().parents[1] / "configs" / "modern.toml"
    cfg = train_cli.make_config(["--config", str(modern), "--out-dir", str(tmp_path)])
    assert (cfg.model.mlp, cfg.model.tie_weights) == ("relu2", False)
    cfg = train_cli.make_config(["--config", str(modern), "--out-dir", str(tmp_path), "--mlp", "gelu",
                                 "--tie-weights"])
    assert (cfg.model.mlp, cfg.model.tie_weights) == ("gelu", True)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_loads_and_changes_only_what_it_names(preset, tmp_path):
    settings = train_cli.read_config_file(str(preset))  # refuses unknown keys
    assert settings, f"{preset.name} sets nothing"
    cfg = train_cli.make_config(["--config", str(preset), "--out-dir", str(tmp_path)])
    default = TrainConfig()
    assert {k: setting(cfg, k) for k in settings} == settings
    repeated = sorted(k for k in settings if settings[k] == setting(default, k))
    assert not repeated, f"{preset.name} repeats defaults: {repeated}"


def tiny_flags(tmp_path: Path) -> list[str]:
    """Flags that make any preset a tiny run here: they override every size (shape, context, vocabulary, batch and
    its tokens, steps, evaluation), the data (a corpus, no dataset), the tokenizer (one trained on it) and the
    device; the preset's other settings (learning rate, betas, warmup, val_fraction, log_interval, its switches)
    are trained as the preset has them."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    return ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--vocab-size", "300",
            "--batch-size", "4", "--total-batch-tokens", "128", "--max-iters", "4", "--eval-interval", "4",
            "--eval-iters", "1", "--data", str(corpus), "--dataset", "", "--dataset-config", "", "--tokenizer", "",
            "--data-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_trains_with_flags_that_make_it_tiny(preset, tmp_path):
    """`--config PRESET` and flags over it, as a user runs it: what the flags do not override is what trains."""
    flags = tiny_flags(tmp_path)
    overridden = set(vars(train_cli.build_parser().parse_args(flags)))
    kept = {k: v for k, v in train_cli.read_config_file(str(preset)).items() if k not in overridden}
    cfg = train_cli.make_config(["--config", str(preset), *flags])
    assert (cfg.dataset, cfg.dataset_config, cfg.tokenizer, cfg.model.n_layer) == (None, None, None, 1)
    assert {k: setting(cfg, k) for k in kept} == kept
    out = train(cfg)
    assert records(out, "eval")[-1]["step"] == 4
    saved = read_config(out)  # what the run trained with
    model_fields = {f.name for f in fields(GPTConfig)}
    assert {k: saved["model" if k in model_fields else "train"][k] for k in kept} == kept
    assert json.loads((out / "train_state.json").read_text())["grad_accum"] == 2  # 128 tokens / (4 x 16)
