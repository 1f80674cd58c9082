"""Export a minigpt checkpoint as a Hugging Face model folder that `transformers` loads with no custom code.

    python -m minigpt.export out/ hf_out/          # then AutoModelForCausalLM.from_pretrained("hf_out")

What a model becomes is GPTConfig.export_format()'s answer (config.EXPORT_FORMATS), and the logits are ours:
- learned or sinusoidal positions, LayerNorm, a gelu / gelu_tanh / relu2 MLP: GPT-2 (`GPT2LMHeadModel`); the
  sinusoidal table is written into GPT-2's position table (so exact up to block_size, where GPT-2 stops), and a
  model without biases is GPT-2 with zero biases;
- ALiBi without biases, LayerNorm, the exact GELU: MPT (`MptForCausalLM`, the same slopes);
- RoPE, RMSNorm, SwiGLU without biases: Llama (`LlamaForCausalLM`), and with our QK-norm Qwen3
  (`Qwen3ForCausalLM`): the formats vLLM and llama.cpp's converters read.
Tied and untied heads export as they are; any other model is refused in one line that names the setting.

The folder is written whole or not at all, never into or around the checkpoint it comes from, and `--overwrite`
replaces only an earlier export, recognised by the marker file it holds (EXPORT_MARKER).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenizer import Tokenizer

from .checkpoint import load_model
from .errors import ConfigError, run_cli
from .hf import CONV1D, FUSED, HEAD, LAYER_NORM_EPS, NAMES, ROPE_THETA, WEIGHTS_FILE
from .model import GPT

# How long an input an MPT export declares (max_seq_len): ALiBi takes any length, and transformers' MPT refuses
# inputs longer than this (it builds its ALiBi bias that long, H x 65536 numbers, on every call). RoPE does not
# extrapolate beyond the training context, so Llama and Qwen3 declare block_size (max_position_embeddings, which
# vLLM and llama.cpp take as the longest context to serve). The training context also goes into
# tokenizer_config.json's model_max_length, where hf.py reads it back.
ANY_LENGTH = 1 << 16
EXPORT_MARKER = ".minigpt-export.json"  # {"format": MARKER_FORMAT, "version", "model_type", "files": [...]}
MARKER_FORMAT = "minigpt-hf-export"


def hf_config(model: GPT, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json for `model`, or a ConfigError naming the setting that no Hugging Face model type computes."""
    c = model.config
    model_type = c.export_format()
    common = {"model_type": model_type, "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_weights,
              "dtype": "float32"}
    if tokenizer.eot_id is not None:  # the tokenizer's real id of <|endoftext|>, wherever it sits
        common.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    if model_type == "gpt2":
        activation = ("relu2" if c.mlp == "relu2" else "gelu" if c.activation == "gelu" else "gelu_pytorch_tanh")
        return {"architectures": ["GPT2LMHeadModel"], "n_positions": c.block_size, "n_embd": c.n_embd,
                "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": activation,
                "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
                "attn_pdrop": c.dropout, **common}
    if model_type == "mpt":
        return {"architectures": ["MptForCausalLM"], "d_model": c.n_embd, "n_heads": c.n_head, "n_layers": c.n_layer,
                "expansion_ratio": 4, "max_seq_len": max(c.block_size, ANY_LENGTH), "no_bias": True, "learned_pos_emb": False,
                "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": c.dropout, "emb_pdrop": c.dropout,
                # attn_pdrop left at 0: transformers 5 types it as an int, so 0.1 would not load
                "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0, "attn_impl": "torch"},
                **common}
    architecture = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    return {"architectures": [architecture], "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
            "intermediate_size": model.blocks[0].mlp.proj.in_features, "hidden_act": "silu",
            "max_position_embeddings": c.block_size, "rms_norm_eps": LAYER_NORM_EPS,
            "rope_theta": ROPE_THETA, "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout, "use_sliding_window": False,
            **common}


def hf_weights(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """Our state dict under the Hugging Face names (the inverse of hf.to_minigpt_names)."""
    body, blocks, block, top = NAMES[model_type]
    theirs_block = {ours: theirs for theirs, ours in block.items()}
    theirs_top = {ours: theirs for theirs, ours in top.items()}
    fused = FUSED.get(model_type, {})
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if model.config.positions == "sinusoidal":  # the fixed table becomes GPT-2's (learned) position embedding
        state["wpe.table.weight"] = model.wpe.table
    for name, tensor in state.items():
        if name == "head.weight":
            if not model.config.tie_weights:  # tied: the same matrix as wte, which transformers re-ties
                out[HEAD] = tensor
            continue
        if name in theirs_top:
            out[f"{body}.{theirs_top[name]}"] = tensor
            continue
        _, layer, *module, leaf = name.split(".")
        module = ".".join(module)
        if module in fused:  # Llama keeps apart what we fuse: our rows, cut in equal parts
            for part, piece in zip(fused[module], tensor.chunk(len(fused[module]))):
                out[f"{body}.{blocks}.{layer}.{part}.{leaf}"] = piece
            continue
        theirs = theirs_block[module]
        if model_type == "gpt2" and theirs in CONV1D and leaf == "weight":
            tensor = tensor.t()
        out[f"{body}.{blocks}.{layer}.{theirs}.{leaf}"] = tensor
    if model_type == "gpt2" and not model.config.bias:  # GPT-2 always has biases: zeros compute the same thing
        for name, tensor in list(out.items()):
            if name.endswith(".weight") and "wte" not in name and "wpe" not in name and name != HEAD:
                rows = tensor.shape[1] if any(c in name for c in CONV1D) else tensor.shape[0]
                out.setdefault(name[: -len("weight")] + "bias", torch.zeros(rows))
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def export(out_dir: str | os.PathLike, hf_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the checkpoint in `out_dir` as a Hugging Face folder `hf_dir` (see save_hf_folder)."""
    source = Path(out_dir).expanduser()
    model, tokenizer, _ = load_model(source)
    return save_hf_folder(model, tokenizer, hf_dir, overwrite, source)


def save_hf_folder(model: GPT, tokenizer: Tokenizer, hf_dir: str | os.PathLike, overwrite: bool = False,
                   source: Path | None = None) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face folder `hf_dir`, all at once: a failed export leaves nothing
    behind. A folder that is, holds or lies inside `source` (the checkpoint) is refused; an existing folder that is
    not empty is replaced only with `overwrite`, and only when it holds an earlier export and nothing else."""
    hf_dir = Path(hf_dir).expanduser()
    config = hf_config(model, tokenizer)  # refuses a model no Hugging Face type computes, before touching a file
    _check_destination(hf_dir, overwrite, source)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.", dir=hf_dir.parent))
    try:
        save_file(hf_weights(model, config["model_type"]), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json",
                    {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config})
        tokenizer.save_huggingface(staging / "tokenizer.json")
        eot = "<|endoftext|>" if tokenizer.eot_id is not None else None
        _write_json(staging / "tokenizer_config.json",
                    {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                     "bos_token": eot, "eos_token": eot, "add_bos_token": False, "add_eos_token": False,
                     "clean_up_tokenization_spaces": False})
        _write_json(staging / EXPORT_MARKER, {"format": MARKER_FORMAT, "version": 1, "model_type": config["model_type"],
                                              "files": sorted(os.listdir(staging))})
        for name in os.listdir(staging):
            os.chmod(staging / name, 0o644)
        os.chmod(staging, 0o755)
        if hf_dir.exists():  # empty, or an earlier export (checked above): set aside until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.old.", dir=hf_dir.parent))
            os.replace(hf_dir, old / "export")
            try:
                os.replace(staging, hf_dir)
            except OSError:
                os.replace(old / "export", hf_dir)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, hf_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hf_dir


def _check_destination(hf_dir: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse a destination whose replacement could lose anything: the checkpoint itself, a folder around or
    inside it, a file, or a folder holding anything but an earlier export (and that only with `overwrite`)."""
    if source is not None:
        src, dst = source.resolve(), hf_dir.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            where = "is" if dst == src else "holds" if dst in src.parents else "lies inside"
            raise ConfigError(f"{hf_dir} {where} the checkpoint folder {source}; export into a folder of its own, "
                              f"outside it (e.g. {source.resolve().parent / (source.resolve().name + '-hf')})")
    if hf_dir.is_symlink() or (hf_dir.exists() and not hf_dir.is_dir()):
        raise ConfigError(f"{hf_dir} is a file or a link, not a folder; choose another path")
    entries = sorted(os.listdir(hf_dir)) if hf_dir.exists() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"{hf_dir} already exists and is not empty; choose another folder, or pass --overwrite to "
                          f"replace an earlier export")
    written = _exported_files(hf_dir)
    if written is None:
        raise ConfigError(f"{hf_dir} does not hold an earlier export (no {EXPORT_MARKER}), and --overwrite replaces "
                          f"only those; choose another folder, or empty it yourself")
    foreign = [name for name in entries if name not in written and name != EXPORT_MARKER]
    if foreign:
        raise ConfigError(f"{hf_dir} holds files that the earlier export did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}), which --overwrite would delete; move them, or "
                          f"choose another folder")


def _exported_files(folder: Path) -> list[str] | None:
    """The files an earlier export wrote into `folder`, from its marker; None when it has no (valid) marker."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = marker.get("files") if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see `python -m minigpt.export --help`)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m minigpt.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="checkpoint folder written by train.py (e.g. out/ or out/best)")
    parser.add_argument("hf_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace hf_dir if it holds an earlier export (and nothing else)")
    args = parser.parse_args(argv)
    folder = export(args.out_dir, args.hf_dir, args.overwrite)
    print(f"wrote {folder}/ ({', '.join(sorted(os.listdir(folder)))}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    run_cli(main)
