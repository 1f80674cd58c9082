"""The presets in configs/ are what `train.py --config` reads: every key is a known setting, flags still override
them, and each trains."""
import json
from pathlib import Path

import pytest

import train as train_cli
from minigpt.config import TrainConfig
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


# What makes any preset train tiny and offline: every shape setting, the data (a local file, no dataset), the
# tokenizer (one trained on that file) and the tokens per step (which derive grad_accum, as in a real run).
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dataset": "", "dataset_config": "",
        "tokenizer": "", "vocab_size": 300, "val_fraction": 0.1, "batch_size": 4, "total_batch_tokens": 128,
        "max_iters": 4, "eval_interval": 4, "eval_iters": 1}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_trains(preset, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    flags = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    cfg = train_cli.make_config(["--config", str(preset), *flags, "--data", str(corpus), "--data-dir",
                                 str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"), "--no-progress",
                                 "--device", "cpu"])
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    assert {k: getattr(cfg.model, k) for k in shape} == {k: TINY[k] for k in shape}
    assert (cfg.dataset, cfg.dataset_config, cfg.tokenizer) == (None, None, None)
    out = train(cfg)
    assert records(out, "eval")[-1]["step"] == 4
    assert json.loads((out / "train_state.json").read_text())["grad_accum"] == 2  # 128 / (4 x 16)
