"""The presets in configs/ are what `train.py --config` reads: every key is a known setting, flags still override
them, and each trains."""
import json
from pathlib import Path

import pytest

import train as train_cli
from minigpt.config import CHOICES, TrainConfig
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


# A tiny run, here: every size (shape, context, batch, steps), the corpus and the tokenizer; a preset's own values
# of these, whatever they are (12 heads, context 1024, a hub tokenizer or dataset, its tokens per step), are left out.
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300, batch_size=4, total_batch_tokens=128,
            max_iters=4, warmup_iters=1, eval_interval=4, eval_iters=1, log_interval=1)


def switches(settings: dict) -> dict:
    """The settings that choose what is trained, and how: choices and on/off settings other than the machine's."""
    return {k: v for k, v in settings.items() if (k in CHOICES or isinstance(v, bool))
            and k not in train_cli.MACHINE_SETTINGS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_trains(preset, tmp_path):
    """Each preset's switches train, at the tiny size (a preset of any size can be tested here)."""
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    preset_switches = switches(train_cli.read_config_file(str(preset)))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**preset_switches, **TINY, "data": str(corpus), "data_dir": str(tmp_path / "cache"),
                                "out_dir": str(tmp_path / "out"), "progress": False, "device": "cpu"}))
    cfg = train_cli.make_config(["--config", str(tiny)])
    assert {k: setting(cfg, k) for k in preset_switches} == preset_switches
    out = train(cfg)
    assert records(out, "eval")[-1]["step"] == 4
    assert json.loads((out / "train_state.json").read_text())["grad_accum"] == 2  # 128 tokens / (4 x 16)


def test_the_tiny_run_overrides_every_size_of_a_large_preset(tmp_path):
    """A preset the size of GPT-2 124M (12 heads, context 1024, a hub tokenizer and dataset) becomes tiny."""
    large = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "positions": "learned",
             "tokenizer": "gpt2", "dataset": "HuggingFaceFW/fineweb-edu", "batch_size": 64, "grad_accum": 8,
             "max_iters": 19073, "lr": 6e-4, "tie_weights": True, "compile": True}
    assert switches(large) == {"positions": "learned", "tie_weights": True}
