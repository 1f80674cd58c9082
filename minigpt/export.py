"""Export a minigpt checkpoint as a Hugging Face model folder that `transformers` loads with no custom code.

    python -m minigpt.export out/ hf_out/          # then AutoModelForCausalLM.from_pretrained("hf_out")

Which architecture it becomes depends on the positions:
- learned: GPT-2 (`GPT2LMHeadModel`), weight for weight;
- sinusoidal: GPT-2 with the fixed table written into its position embedding (exact up to block_size; GPT-2
  refuses longer inputs);
- ALiBi without biases (trained with --no-bias): MPT (`MptForCausalLM`), which uses ALiBi with the same slopes.
A model without biases becomes GPT-2 with zero biases, which computes the same thing.
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
from .hf import CONV1D, LAYER_NORM_EPS, NAMES, WEIGHTS_FILE
from .model import GPT


def hf_config(model: GPT, tokenizer: Tokenizer) -> tuple[str, dict[str, Any]]:
    """(model_type, config.json) for `model`, or a ConfigError saying which settings can be exported."""
    c = model.config
    eot = tokenizer.eot_id
    common = {"vocab_size": c.vocab_size, "layer_norm_epsilon": LAYER_NORM_EPS, "tie_word_embeddings": c.tie_weights,
              "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32"}
    if c.positions in ("learned", "sinusoidal"):
        return "gpt2", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.block_size,
                        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
                        "activation_function": "gelu" if c.activation == "gelu" else "gelu_pytorch_tanh",
                        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, **common}
    if c.bias or c.activation != "gelu":
        raise ConfigError(f"this ALiBi model has {'biases' if c.bias else 'the tanh GELU'}, which transformers' "
                          f"ALiBi model (MPT) has not; exportable are learned and sinusoidal positions (as GPT-2) "
                          f"and ALiBi trained with --no-bias and the exact GELU (as MPT)")
    return "mpt", {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": c.n_embd,
                   "n_heads": c.n_head, "n_layers": c.n_layer, "expansion_ratio": 4, "max_seq_len": c.block_size,
                   "no_bias": True, "learned_pos_emb": False, "resid_pdrop": c.dropout, "emb_pdrop": c.dropout,
                   # attn_pdrop left at 0: transformers 5 types it as an int, so 0.1 would not load
                   "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0, "attn_impl": "torch"},
                   **common}


def hf_weights(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """Our state dict under the Hugging Face names (the inverse of hf.to_minigpt_names)."""
    prefix, block, top = NAMES[model_type]
    theirs_block = {ours: theirs for theirs, ours in block.items()}
    theirs_top = {ours: theirs for theirs, ours in top.items()}
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if model.config.positions == "sinusoidal":  # the fixed table becomes GPT-2's (learned) position embedding
        state["wpe.table.weight"] = model.wpe.table
    for name, tensor in state.items():
        if name == "head.weight" and model.config.tie_weights:
            continue  # the same matrix as wte; transformers re-ties it
        if name == "head.weight":
            out["lm_head.weight"] = tensor
            continue
        if name in theirs_top:
            out["transformer." + theirs_top[name]] = tensor
            continue
        _, layer, *module, leaf = name.split(".")
        theirs = theirs_block[".".join(module)]
        if model_type == "gpt2" and theirs in CONV1D and leaf == "weight":
            tensor = tensor.t()
        out[f"transformer.{prefix}.{layer}.{theirs}.{leaf}"] = tensor
    if model_type == "gpt2" and not model.config.bias:  # GPT-2 always has biases: zeros compute the same thing
        for name, tensor in list(out.items()):
            if name.endswith(".weight") and "wte" not in name and "wpe" not in name and "lm_head" not in name:
                bias = name[: -len("weight")] + "bias"
                rows = tensor.shape[1] if any(c in name for c in CONV1D) else tensor.shape[0]
                out.setdefault(bias, torch.zeros(rows))
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def export(out_dir: str | os.PathLike, hf_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the checkpoint in `out_dir` as a Hugging Face folder `hf_dir` (all at once: a failed export leaves
    nothing behind, and an existing folder is only replaced with `overwrite`)."""
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and (not hf_dir.is_dir() or any(hf_dir.iterdir())) and not overwrite:
        raise ConfigError(f"{hf_dir} already exists and is not empty; choose another folder or pass --overwrite")
    model, tokenizer, _ = load_model(out_dir)
    model_type, config = hf_config(model, tokenizer)
    if tokenizer.eot_id is None:
        config.pop("bos_token_id"), config.pop("eos_token_id")
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.", dir=hf_dir.parent))
    try:
        save_file(hf_weights(model, model_type), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json",
                    {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config})
        tokenizer.save_huggingface(staging / "tokenizer.json")
        eot = "<|endoftext|>" if tokenizer.eot_id is not None else None
        _write_json(staging / "tokenizer_config.json",
                    {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                     "bos_token": eot, "eos_token": eot, "add_bos_token": False, "add_eos_token": False,
                     "clean_up_tokenization_spaces": False})
        for name in os.listdir(staging):
            os.chmod(staging / name, 0o644)
        if hf_dir.exists():
            shutil.rmtree(hf_dir) if hf_dir.is_dir() else hf_dir.unlink()
        os.replace(staging, hf_dir)
        os.chmod(hf_dir, 0o755)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hf_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see `python -m minigpt.export --help`)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m minigpt.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="checkpoint folder written by train.py (e.g. out/ or out/best)")
    parser.add_argument("hf_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--overwrite", action="store_true", help="replace hf_dir if it exists")
    args = parser.parse_args(argv)
    folder = export(args.out_dir, args.hf_dir, args.overwrite)
    print(f"wrote {folder}/ ({', '.join(sorted(os.listdir(folder)))}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    run_cli(main)
