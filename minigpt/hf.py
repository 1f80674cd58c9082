"""Hugging Face layout in: GPT-2-family models (and the MPT files `minigpt.export` writes) as minigpt GPTs.

A model folder in that layout holds `config.json` (`model_type`, sizes), `model.safetensors` (or shards
`model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`) and the tokenizer files. The
weight names and shapes differ from ours in three ways, all undone here exactly:

- GPT-2 stores its projections as `Conv1D`, whose weight is (in, out): the transpose of an `nn.Linear`'s;
- its names (`h.3.attn.c_attn`) are not ours (`blocks.3.attn.qkv`); Q, K and V are fused in the same order;
- a tied output head is not stored at all (it is the token embedding).

GPT-2 uses the tanh-approximated GELU (`activation="gelu_tanh"` here) and LayerNorm epsilon 1e-5, torch's
default. Weights are read from safetensors only: a `pytorch_model.bin` is a pickle, which can run code on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tokenizer import Tokenizer, TokenizerError

from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .model import GPT

SUPPORTED_TYPES = ("gpt2", "mpt")  # mpt: only the ALiBi models without biases that minigpt.export writes
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_FILES = ["*.safetensors", INDEX_FILE, "config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
TOKENIZER_HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                       "merges.txt"]
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which our model uses
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # names transformers gives the tanh approximation


# Their names -> ours, per model type: (block list prefix, names inside a block, names outside the blocks).
NAMES = {
    "gpt2": ("h",
             {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
              "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"},
             {"wte.weight": "wte.weight", "wpe.weight": "wpe.table.weight", "ln_f.weight": "ln_f.weight",
              "ln_f.bias": "ln_f.bias", "lm_head.weight": "head.weight"}),
    "mpt": ("blocks",
            {"norm_1": "ln_1", "norm_2": "ln_2", "attn.Wqkv": "attn.qkv", "attn.out_proj": "attn.proj",
             "ffn.up_proj": "mlp.fc", "ffn.down_proj": "mlp.proj"},
            {"wte.weight": "wte.weight", "norm_f.weight": "ln_f.weight", "lm_head.weight": "head.weight"}),
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's (in, out) weights


# ------------------------------------------------------------------------------------------------ where
def resolve(name_or_path: str | os.PathLike, patterns: list[str] = HUB_FILES) -> Path:
    """A local folder as it is; anything else that looks like a hub name ("gpt2", "openai-community/gpt2") is
    downloaded with huggingface_hub (the files matching `patterns`: safetensors, config and tokenizer files) into
    its cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1 \
            or not name.strip():
        raise CheckpointError(f"{name} is not a folder; give the folder of a Hugging Face model "
                              f"(config.json + model.safetensors) or a hub name such as gpt2")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(f"{name} is not a folder, and huggingface_hub (needed to download it) is not "
                              f"installed; `pip install huggingface_hub`, or pass the path of a downloaded folder")
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except HFValidationError:
        raise CheckpointError(f"{name} is neither a folder nor a valid hub name; give the folder of a Hugging Face "
                              f"model (config.json + model.safetensors) or a hub name such as gpt2") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model {name} on the Hugging Face hub (and no folder of that name here); "
                              f"check the name, or pass the path of a downloaded folder") from None
    except Exception as exc:  # offline, DNS, proxy, timeouts: huggingface_hub raises many types for them
        raise CheckpointError(f"cannot download {name} from the Hugging Face hub: no network was reachable "
                              f"({type(exc).__name__}); download the folder on a machine with network "
                              f"(`hf download {name}`) and pass its path") from None


# ----------------------------------------------------------------------------------------------- config
def read_hf_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(model_type, config.json) of a model folder, refusing model types this reader cannot map."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); the folder is corrupt") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path} describes a {model_type!r} model; supported are {', '.join(SUPPORTED_TYPES)} "
                              f"(GPT-2 family: gpt2, distilgpt2, gpt2-medium/large/xl, ...)")
    return model_type, config


def gpt_config(folder: Path) -> GPTConfig:
    """The GPTConfig of the model in `folder`, or a CheckpointError naming the setting that has no equivalent."""
    model_type, c = read_hf_config(folder)
    where = folder / "config.json"

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: {what}, which minigpt's model does not have; it cannot be loaded")

    try:
        if model_type == "gpt2":
            n_embd = int(c.get("n_embd", 768))
            act = c.get("activation_function", "gelu_new")
            need(c.get("n_inner") in (None, 4 * n_embd), f"n_inner={c.get('n_inner')} (not 4 x n_embd)")
            need(act in TANH_GELUS + ("gelu",), f"activation_function={act!r}")
            need(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx", False),
                 "attention scaled other than by 1/sqrt(head size)")
            need(not c.get("add_cross_attention", False), "cross-attention")
            config = GPTConfig(vocab_size=int(c.get("vocab_size", 50257)), block_size=int(c.get("n_positions", 1024)),
                               n_layer=int(c.get("n_layer", 12)), n_head=int(c.get("n_head", 12)), n_embd=n_embd,
                               positions="learned", bias=True, tie_weights=bool(c.get("tie_word_embeddings", True)),
                               activation="gelu" if act == "gelu" else "gelu_tanh")
        else:  # mpt
            attn = c.get("attn_config") or {}
            need(attn.get("alibi", False) and attn.get("alibi_bias_max", 8) == 8, "positions other than ALiBi (max 8)")
            need(c.get("no_bias", True), "Linear biases")
            need(c.get("expansion_ratio", 4) == 4, f"expansion_ratio={c.get('expansion_ratio')}")
            need(not attn.get("qk_ln") and not attn.get("clip_qkv") and attn.get("softmax_scale") is None
                 and not attn.get("prefix_lm"), "a non-standard attention (qk_ln, clip_qkv, softmax_scale, prefix_lm)")
            need(c.get("logit_scale") is None and c.get("embedding_fraction", 1.0) == 1.0,
                 "a logit_scale or embedding_fraction")
            config = GPTConfig(vocab_size=int(c.get("vocab_size", 50368)), block_size=int(c.get("max_seq_len", 2048)),
                               n_layer=int(c.get("n_layers", 24)), n_head=int(c.get("n_heads", 16)),
                               n_embd=int(c.get("d_model", 2048)), positions="alibi", bias=False,
                               tie_weights=bool(c.get("tie_word_embeddings", True)), activation="gelu")
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{where} holds invalid sizes: {exc}") from None
    need(float(c.get("layer_norm_epsilon", LAYER_NORM_EPS)) == LAYER_NORM_EPS,
         f"layer_norm_epsilon={c.get('layer_norm_epsilon')} (minigpt uses {LAYER_NORM_EPS})")
    return config


# ---------------------------------------------------------------------------------------------- weights
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model in `folder`, from model.safetensors or its shards; never from a pickle."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({exc}); the folder is corrupt") from None
    elif (folder / WEIGHTS_FILE).is_file():
        shards = [WEIGHTS_FILE]
    elif any((folder / name).is_file() for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")):
        raise CheckpointError(f"{folder} holds only pickled/framework weights (pytorch_model.bin), which minigpt "
                              f"never loads (a pickle can run code); convert them once where you trust the file: "
                              f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                              f"safe_serialization=True)`, which writes model.safetensors")
    else:
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); is it a Hugging Face model folder?")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            weights.update(load_file(str(folder / shard)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{folder / shard} cannot be read: {str(exc).splitlines()[0]}") from None
    return weights


def to_minigpt_names(weights: dict[str, torch.Tensor], model_type: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors renamed (and Conv1D weights transposed) into our state-dict names."""
    # hub files of the original GPT-2 have bare names ("h.0..."); save_pretrained writes "transformer.h.0..."
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
    prefix, block, top = NAMES[model_type]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old GPT-2 files store the causal mask: not weights
            continue
        if name in top:
            out[top[name]] = tensor
            continue
        parts = name.split(".")
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        if parts[0] != prefix or not parts[1].isdigit() or module not in block:
            raise CheckpointError(f"the pretrained weights hold {name}, which a {model_type} model of minigpt's "
                                  f"shape does not have; the files do not match config.json")
        if model_type == "gpt2" and module in CONV1D and leaf == "weight":
            tensor = tensor.t()
        out[f"blocks.{parts[1]}.{block[module]}.{leaf}"] = tensor
    if config.tie_weights:
        out.pop("head.weight", None)  # the same matrix as wte: loaded once
    return out


def load_into(model: GPT, name_or_path: str | os.PathLike) -> None:
    """Copy the pretrained weights of `name_or_path` into `model`, whose config must be that model's (a shorter
    block_size keeps the first rows of the position table)."""
    folder = resolve(name_or_path)
    model_type, _ = read_hf_config(folder)
    weights = to_minigpt_names(read_weights(folder), model_type, model.config)
    table = weights.get("wpe.table.weight")
    if table is not None and model.config.block_size < table.shape[0]:
        weights["wpe.table.weight"] = table[:model.config.block_size]
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (k == "head.weight" and model.config.tie_weights)}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k]]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])}")
        raise CheckpointError(f"the weights in {folder} do not fit a model of its config.json ({detail}); "
                              f"the folder is corrupt or the model settings differ from the pretrained ones")
    with torch.no_grad():
        params = model.state_dict()
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_pretrained(name_or_path: str | os.PathLike, block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """GPT.from_pretrained: the model in eval mode, float32, on the CPU."""
    folder = resolve(name_or_path)  # once: a hub name is looked up on the network
    config = pretrained_config(folder, {"block_size": block_size} if block_size else {})
    model = GPT(GPTConfig(**{**config.to_dict(), "dropout": dropout}))
    load_into(model, folder)
    return model.eval()


def pretrained_config(name_or_path: str | os.PathLike, given: dict[str, Any]) -> GPTConfig:
    """The pretrained model's GPTConfig with the settings a finetune may change (`given`: a shorter block_size,
    dropout); any other given setting must agree with the pretrained model, or this is a ConfigError."""
    folder = resolve(name_or_path)
    config = gpt_config(folder).to_dict()
    for key, value in given.items():
        if key == "dropout":
            config[key] = value
        elif key == "block_size":  # learned positions: the table is cropped to the first block_size rows
            if config["positions"] == "learned" and value > config[key]:
                raise ConfigError(f"--block-size {value} is longer than the {config[key]} positions that "
                                  f"{name_or_path} learned; use --block-size {config[key]} or less")
            config[key] = value
        elif config.get(key, value) != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value} contradicts {name_or_path}, whose {key} is "
                              f"{config[key]}; leave it out (the shape comes from the pretrained model)")
    return GPTConfig(**config)


def load_tokenizer(name_or_path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (or hub name), checked against its embedding rows: more tokens
    than rows cannot be embedded; fewer is fine (vocabularies are often padded to a round size)."""
    folder = resolve(name_or_path)
    try:
        tokenizer = Tokenizer.from_huggingface(folder)
    except TokenizerError as exc:
        raise CheckpointError(f"the tokenizer of {name_or_path} cannot be read: {exc}") from None
    rows = vocab_size if vocab_size is not None else gpt_config(folder).vocab_size
    if tokenizer.vocab_size > rows:
        raise CheckpointError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model's "
                              f"embedding has only {rows} rows; the tokenizer does not belong to this model")
    return tokenizer


def open_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """--tokenizer: a minigpt tokenizer .json; a Hugging Face byte-level BPE as tokenizer.json, vocab.json (+
    merges.txt) or their folder (a minigpt checkpoint folder too); or a hub name such as gpt2, of which only the
    tokenizer files are downloaded."""
    path = Path(spec).expanduser()
    if not path.exists():
        name = str(spec)
        if path.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
            raise ConfigError(f"no tokenizer file or folder {spec}; give a minigpt tokenizer .json, a Hugging Face "
                              f"tokenizer.json or folder, or a hub name such as gpt2")
        try:
            path = resolve(name, TOKENIZER_HUB_FILES)
        except CheckpointError as exc:
            raise ConfigError(f"--tokenizer: {exc}") from None
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    try:
        if path.is_file() and _minigpt_format(path):
            return Tokenizer.load(path)  # also the one that explains a tiktoken file or a corrupt one
        return Tokenizer.from_huggingface(path)
    except TokenizerError as exc:
        raise ConfigError(f"--tokenizer {spec}: {exc}") from None


def _minigpt_format(path: Path) -> bool:
    """Whether a tokenizer file is minigpt's own JSON (or not JSON at all, which Tokenizer.load explains) rather
    than a Hugging Face one."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return True
    return not isinstance(doc, dict) or "format" in doc
