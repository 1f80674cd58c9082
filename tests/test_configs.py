"""The presets in configs/ are what `train.py --config` reads: every key is a known setting, flags still override
them, and each trains."""
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


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_trains(preset, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = train_cli.make_config(["--config", str(preset), "--data", str(corpus), "--data-dir", str(tmp_path / "cache"),
                                 "--out-dir", str(tmp_path / "out"), "--vocab-size", "300", "--n-embd", "32",
                                 "--block-size", "16", "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1",
                                 "--no-progress", "--device", "cpu"])
    out = train(cfg)
    assert records(out, "eval")[-1]["step"] == 4
