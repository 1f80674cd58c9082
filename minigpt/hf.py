"""Hugging Face layout in: GPT-2-family models, and the MPT, Llama and Qwen3 shapes `minigpt.export` writes.

A model folder in that layout holds `config.json` (`model_type`, sizes), `model.safetensors` (or shards
`model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`) and the tokenizer files. The
weight names and shapes differ from ours in four ways, all undone here exactly:

- GPT-2 stores its projections as `Conv1D`, whose weight is (in, out): the transpose of an `nn.Linear`'s;
- their names (`h.3.attn.c_attn`) are not ours (`blocks.3.attn.qkv`);
- we fuse what Llama keeps apart: Q, K and V in one projection (`attn.qkv`), SwiGLU's value and gate in one
  (`mlp.fc`, value first: `up_proj`, then `gate_proj`);
- a tied output head is not stored at all (it is the token embedding).

GPT-2 uses the tanh-approximated GELU (`activation="gelu_tanh"` here) and LayerNorm epsilon 1e-5, torch's
default. Weights are read from safetensors only: a `pytorch_model.bin` is a pickle, which can run code on load.
A minigpt checkpoint folder (out/, out/best) is not in this layout: `load_pretrained` reads it as sample.py does,
and the other readers here say which function reads it.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tokenizer import Tokenizer, TokenizerError

from .checkpoint import has_checkpoint, load_model
from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .model import GPT, NORM_EPS

SUPPORTED_TYPES = ("gpt2", "mpt", "llama", "qwen3")  # mpt, llama, qwen3: the shapes that minigpt.export writes
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What is downloaded of a hub repository: for --tokenizer its tokenizer files, for a model its weights and config too.
TOKENIZER_HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                       "merges.txt"]
HUB_FILES = ["*.safetensors", INDEX_FILE, "config.json", "generation_config.json", *TOKENIZER_HUB_FILES]
LAYER_NORM_EPS = NORM_EPS  # our norms' epsilon (torch's nn.LayerNorm default): an import must have the same
ROPE_THETA = 10000.0  # the base of our rotary angles, θ_k = 10000^(-2k/d) (positions.RotaryPositions)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # names transformers gives the tanh approximation


# Their names -> ours, per model type: (the prefix of the model's body, its list of blocks, names inside a block,
# names outside the blocks). The output head sits outside the body, as lm_head.weight, in every type.
_LLAMA_BLOCK = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.proj",
                "mlp.down_proj": "mlp.proj"}
_LLAMA_TOP = {"embed_tokens.weight": "wte.weight", "norm.weight": "ln_f.weight"}
NAMES = {
    "gpt2": ("transformer", "h",
             {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
              "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"},
             {"wte.weight": "wte.weight", "wpe.weight": "wpe.table.weight", "ln_f.weight": "ln_f.weight",
              "ln_f.bias": "ln_f.bias"}),
    "mpt": ("transformer", "blocks",
            {"norm_1": "ln_1", "norm_2": "ln_2", "attn.Wqkv": "attn.qkv", "attn.out_proj": "attn.proj",
             "ffn.up_proj": "mlp.fc", "ffn.down_proj": "mlp.proj"},
            {"wte.weight": "wte.weight", "norm_f.weight": "ln_f.weight"}),
    "llama": ("model", "layers", _LLAMA_BLOCK, _LLAMA_TOP),
    "qwen3": ("model", "layers", {**_LLAMA_BLOCK, "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"},
              _LLAMA_TOP),
}
HEAD = "lm_head.weight"
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's (in, out) weights
# Our fused projections that Llama and Qwen3 keep apart: their parts, in the order ours stacks their rows.
_LLAMA_FUSED = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.fc": ("mlp.up_proj", "mlp.gate_proj")}
FUSED = {"llama": _LLAMA_FUSED, "qwen3": _LLAMA_FUSED}


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
    if has_checkpoint(folder):
        where = shlex.quote(str(folder))
        raise CheckpointError(f"{folder} is a minigpt checkpoint, not a Hugging Face model folder: sample it with "
                              f"`python sample.py --out-dir {where}` (GPT.from_pretrained reads it too), or turn "
                              f"it into one with `python -m minigpt.export {where} HF_DIR`")
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
                              f"(GPT-2 family: gpt2, distilgpt2, gpt2-medium/large/xl, ...; mpt, llama and qwen3 "
                              f"of the shapes minigpt.export writes)")
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
            need(act in TANH_GELUS + ("gelu", "relu2"), f"activation_function={act!r}")
            need(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx", False),
                 "attention scaled other than by 1/sqrt(head size)")
            need(not c.get("add_cross_attention", False), "cross-attention")
            eps = c.get("layer_norm_epsilon", LAYER_NORM_EPS)
            config = GPTConfig(vocab_size=int(c.get("vocab_size", 50257)), block_size=int(c.get("n_positions", 1024)),
                               n_layer=int(c.get("n_layer", 12)), n_head=int(c.get("n_head", 12)), n_embd=n_embd,
                               positions="learned", bias=True, tie_weights=bool(c.get("tie_word_embeddings", True)),
                               mlp="relu2" if act == "relu2" else "gelu",
                               activation="gelu_tanh" if act in TANH_GELUS else "gelu")
        elif model_type == "mpt":
            attn = c.get("attn_config") or {}
            need(attn.get("alibi", False) and attn.get("alibi_bias_max", 8) == 8, "positions other than ALiBi (max 8)")
            need(c.get("no_bias", True), "Linear biases")
            need(c.get("expansion_ratio", 4) == 4, f"expansion_ratio={c.get('expansion_ratio')}")
            need(not attn.get("qk_ln") and not attn.get("clip_qkv") and attn.get("softmax_scale") is None
                 and not attn.get("prefix_lm"), "a non-standard attention (qk_ln, clip_qkv, softmax_scale, prefix_lm)")
            need(c.get("logit_scale") is None and c.get("embedding_fraction", 1.0) == 1.0,
                 "a logit_scale or embedding_fraction")
            eps = c.get("layer_norm_epsilon", LAYER_NORM_EPS)
            config = GPTConfig(vocab_size=int(c.get("vocab_size", 50368)),
                               block_size=_training_context(folder, int(c.get("max_seq_len", 2048))),
                               n_layer=int(c.get("n_layers", 24)), n_head=int(c.get("n_heads", 16)),
                               n_embd=int(c.get("d_model", 2048)), positions="alibi", bias=False,
                               tie_weights=bool(c.get("tie_word_embeddings", True)), activation="gelu")
        else:  # llama, qwen3 (transformers' defaults where a key is missing)
            n_embd, n_head = int(c.get("hidden_size", 4096)), int(c.get("num_attention_heads", 32))
            head_dim = c.get("head_dim") or (128 if model_type == "qwen3" else n_embd // n_head)
            rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
            theta = rope.get("rope_theta", c.get("rope_theta", ROPE_THETA))
            need(c.get("num_key_value_heads") in (None, n_head), "grouped-query attention (num_key_value_heads="
                 f"{c.get('num_key_value_heads')} of {n_head} heads)")
            need(head_dim * n_head == n_embd, f"head_dim={head_dim} (not hidden_size / num_attention_heads)")
            need(c.get("hidden_act", "silu") == "silu", f"hidden_act={c.get('hidden_act')!r}")
            width = c.get("intermediate_size", 22016 if model_type == "qwen3" else 11008)
            need(width == 8 * n_embd // 3, f"intermediate_size={width} (minigpt's SwiGLU is 8 x hidden_size / 3 wide)")
            need(rope.get("rope_type", rope.get("type", "default")) == "default" and float(theta) == ROPE_THETA,
                 f"RoPE other than the default with theta {ROPE_THETA:g} ({rope or {'rope_theta': theta}})")
            need(not c.get("attention_bias") and not c.get("mlp_bias"), "biases")
            need(not c.get("use_sliding_window") and all(t == "full_attention" for t in c.get("layer_types") or []),
                 "sliding-window attention")
            eps = c.get("rms_norm_eps", 1e-6)
            config = GPTConfig(vocab_size=int(c.get("vocab_size", 32000)),
                               block_size=_training_context(folder, int(c.get("max_position_embeddings", 2048))),
                               n_layer=int(c.get("num_hidden_layers", 32)), n_head=n_head, n_embd=n_embd,
                               positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                               qk_norm=model_type == "qwen3", tie_weights=bool(c.get("tie_word_embeddings", False)))
    except (TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{where} holds invalid sizes: {exc}") from None
    need(float(eps) == LAYER_NORM_EPS, f"a norm epsilon of {eps} (minigpt uses {LAYER_NORM_EPS})")
    return config


def _training_context(folder: Path, declared: int) -> int:
    """The block_size of a model whose positions take any length (ALiBi, RoPE): the config declares how far it may
    be run (`minigpt.export` writes a large number there for ALiBi), the tokenizer's model_max_length how long its
    training inputs were; the shorter, as the window to evaluate and finetune on."""
    try:
        trained = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["model_max_length"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return declared
    return trained if isinstance(trained, int) and 0 < trained < declared else declared


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
    """Hugging Face tensors renamed (Conv1D weights transposed, Llama's separate projections fused) into our
    state-dict names."""
    body, blocks, block, top = NAMES[model_type]
    fused_from = {part: (ours, k) for ours, parts in FUSED.get(model_type, {}).items() for k, part in enumerate(parts)}
    # hub files of the original GPT-2 have bare names ("h.0..."); save_pretrained writes "transformer.h.0..."
    weights = {k.removeprefix(body + "."): v for k, v in weights.items()}
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}  # our fused name -> its parts by position
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old GPT-2 files store the causal mask: not weights
            continue
        if name == HEAD or name in top:
            out["head.weight" if name == HEAD else top[name]] = tensor
            continue
        parts = name.split(".")
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        if parts[0] != blocks or not parts[1].isdigit() or (module not in block and module not in fused_from):
            raise CheckpointError(f"the pretrained weights hold {name}, which a {model_type} model of minigpt's "
                                  f"shape does not have; the files do not match config.json")
        if model_type == "gpt2" and module in CONV1D and leaf == "weight":
            tensor = tensor.t()
        if module in fused_from:
            ours, k = fused_from[module]
            pieces.setdefault(f"blocks.{parts[1]}.{ours}.{leaf}", {})[k] = tensor
        else:
            out[f"blocks.{parts[1]}.{block[module]}.{leaf}"] = tensor
    for name, by_position in pieces.items():
        ours = name.split(".")[2] + "." + name.split(".")[3]
        if sorted(by_position) != list(range(len(FUSED[model_type][ours]))):
            raise CheckpointError(f"the pretrained weights hold only some of {FUSED[model_type][ours]} for {name}; "
                                  f"the files are incomplete")
        out[name] = torch.cat([by_position[k] for k in sorted(by_position)])
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
    """GPT.from_pretrained: the model in eval mode, float32, on the CPU. A minigpt checkpoint folder (out/,
    out/best) is read too, with the same settings."""
    folder = resolve(name_or_path)  # once: a hub name is looked up on the network
    given = {"dropout": dropout, **({"block_size": block_size} if block_size else {})}
    if has_checkpoint(folder):
        trained, _, _ = load_model(folder)
        model = GPT(with_given(trained.config.to_dict(), given, str(name_or_path)))
        state = trained.state_dict()
        if "wpe.table.weight" in state:  # learned positions: a shorter block_size keeps the first rows
            state["wpe.table.weight"] = state["wpe.table.weight"][:model.config.block_size]
        model.load_state_dict(state)
        return model.eval()
    model = GPT(pretrained_config(folder, given))
    load_into(model, folder)
    return model.eval()


def pretrained_config(name_or_path: str | os.PathLike, given: dict[str, Any]) -> GPTConfig:
    """The pretrained model's GPTConfig with the settings a finetune may change (`given`: a shorter block_size,
    dropout); any other given setting must agree with the pretrained model, or this is a ConfigError."""
    return with_given(gpt_config(resolve(name_or_path)).to_dict(), given, str(name_or_path))


def with_given(config: dict[str, Any], given: dict[str, Any], name: str) -> GPTConfig:
    """`config` (a pretrained model's settings) with those of `given` that a finetune or a reader may change."""
    config = dict(config)
    for key, value in given.items():
        if key == "dropout":
            config[key] = value
        elif key == "block_size":  # learned positions: the table is cropped to the first block_size rows
            limit = GPTConfig(**config).context_limit
            if limit is not None and value > limit:
                raise ConfigError(f"--block-size {value} is longer than the {limit} positions that {name} learned; "
                                  f"use --block-size {limit} or less")
            config[key] = value
        elif config.get(key, value) != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value} contradicts {name}, whose {key} is "
                              f"{config[key]}; leave it out (the shape comes from the pretrained model)")
    return GPTConfig(**config)


def load_tokenizer(name_or_path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (or hub name), checked against its embedding rows: more tokens
    than rows cannot be embedded; fewer is fine (vocabularies are often padded to a round size)."""
    folder = resolve(name_or_path)
    if has_checkpoint(folder):  # a minigpt checkpoint: its own tokenizer file
        return load_model(folder)[1]
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
    try:  # a folder (ours or Hugging Face's) or vocab.json; else a file, which Tokenizer.load reads in either format
        if path.is_dir() or path.name == "vocab.json":
            return Tokenizer.from_huggingface(path)
        return Tokenizer.load(path)  # also the one that explains a tiktoken file or a corrupt one
    except TokenizerError as exc:
        raise ConfigError(f"--tokenizer {spec}: {exc}") from None
