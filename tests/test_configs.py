"""The presets in configs/ are what `train.py --config` reads: every key is a known setting, flags still override
them, and each trains."""
from pathlib import Path

import pytest

import train as train_cli
from minigpt.config import TrainConfig
from minigpt.trainer import train

from helpers import records, write_corpus

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_the_modern_preset_exists():
    assert "modern" in [p.stem for p in PRESETS]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_loads_changes_settings_and_flags_override_it(preset, tmp_path):
    settings = train_cli.read_config_file(str(preset))  # refuses unknown keys
    assert settings, f"{preset.name} sets nothing"
    cfg = train_cli.make_config(["--config", str(preset), "--out-dir", str(tmp_path), "--seed", "7"])
    default = TrainConfig()
    changed = {k for k in settings if getattr(cfg.model if hasattr(cfg.model, k) else cfg, k) !=
               getattr(default.model if hasattr(default.model, k) else default, k)}
    assert changed == set(settings), f"{preset.name} repeats defaults: {sorted(set(settings) - changed)}"
    assert cfg.seed == 7


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_trains(preset, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = train_cli.make_config(["--config", str(preset), "--data", str(corpus), "--data-dir", str(tmp_path / "cache"),
                                 "--out-dir", str(tmp_path / "out"), "--vocab-size", "300", "--n-embd", "32",
                                 "--block-size", "16", "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1",
                                 "--no-progress", "--device", "cpu"])
    out = train(cfg)
    assert records(out, "eval")[-1]["step"] == 4
