"""Settings as dataclasses: the one place where defaults live and values are checked."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, get_args, get_type_hints

from .errors import ConfigError

POSITION_KINDS = ("learned", "sinusoidal", "alibi", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
OPTIMIZERS = ("adamw", "muon")
ATTENTION_KERNELS = ("sdpa", "flex")  # torch's scaled_dot_product_attention, or FlexAttention (minigpt/attention.py)
FLEX_MIN_HEAD_DIM = 16  # FlexAttention's fused kernel multiplies tiles of at least 16 channels (triton's tl.dot)
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact (erf) GELU, or GPT-2's tanh approximation (for its pretrained weights)
# Settings that are paths: `~` is expanded in them, wherever the value comes from (flag, config file, Python).
PATH_FIELDS = ("data", "data_dir", "tokenizer", "init_from", "out_dir", "eval_choices")
# Path settings that may name a Hugging Face hub repository instead ("gpt2"): a path only where one exists.
HUB_NAME_FIELDS = ("tokenizer", "init_from")


def expand_path(path: str) -> str:
    """`~/x` as the shell would expand it, for values that reached us quoted (config files, "~/x" in quotes)."""
    return os.path.expanduser(path)


def _check_choice(name: str, value: str) -> None:
    """A choice setting must hold one of CHOICES[name] (device: also cuda:N; pattern: also a regex, checked by
    the tokenizer)."""
    if name == "device" and value.startswith("cuda:") and value[5:].isdigit():
        return
    if name == "pattern" or value in CHOICES[name]:
        return
    extra = f" or {OPEN_CHOICES[name]}" if name in OPEN_CHOICES else ""
    raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}{extra}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def from_dict_strict(cls, values: dict[str, Any]):
    """Build dataclass `cls` from a dict, refusing keys it does not know (a typo should not be silently ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


@dataclass
class GPTConfig:
    """Shape of the network. Defaults are a small model that trains on a CPU."""

    vocab_size: int = 4096
    block_size: int = 256  # training context length (the limit for learned positions only)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    positions: str = "alibi"  # one of POSITION_KINDS
    bias: bool = True  # biases in Linear layers and LayerNorms
    tie_weights: bool = True  # output head shares the token embedding matrix
    norm: str = "layernorm"  # one of NORMS; layernorm is GPT-2's
    mlp: str = "gelu"  # one of MLPS; gelu is GPT-2's
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before their dot product
    activation: str = "gelu"  # one of ACTIVATIONS; gelu_tanh is GPT-2's approximation (set when loading its weights)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _check_choice("positions", self.positions)
        _check_choice("activation", self.activation)
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope positions rotate pairs of channels: the head dimension n_embd / n_head = "
                              f"{self.n_embd // self.n_head} must be even; change n_embd or n_head")
        _check_choice("norm", self.norm)
        _check_choice("mlp", self.mlp)
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def attention_kernels(self, training: bool) -> tuple[str, ...]:
        """The attention kernels (--attention) that can compute this model: SDPA always; FlexAttention for a head
        dimension of at least FLEX_MIN_HEAD_DIM, and in training only without dropout, which it does not have (at
        inference dropout is off)."""
        flex = self.n_embd // self.n_head >= FLEX_MIN_HEAD_DIM and not (training and self.dropout > 0)
        return ATTENTION_KERNELS if flex else ("sdpa",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        return from_dict_strict(cls, values)

    # What these settings can do, answered once for every path (sampling, evaluation, export, import, serving):
    # a path asks here instead of re-deriving it, and refuses in one line what it cannot honour.

    @property
    def context_limit(self) -> int | None:
        """The longest input the model computes: block_size with learned positions (a table of that many rows);
        None with the others, which compute any position (how well beyond block_size is another matter)."""
        return self.block_size if self.positions == "learned" else None

    def export_format(self) -> str:
        """The Hugging Face model type that computes exactly what this model computes (see EXPORT_FORMATS), or a
        ConfigError that names the setting none of them has."""
        for name, needs in EXPORT_FORMATS.items():
            if all(getattr(self, setting) in allowed for setting, allowed in needs.items()):
                return name
        raise ConfigError(_export_refusal(self))


# ---------------------------------------------------------------------------------- what a setting exports as
# The Hugging Face model types a model exports as, each with the values of the settings under which transformers
# computes exactly what our model computes; a setting not named may take any value (tied or untied heads, dropout;
# GPT-2 has biases everywhere, so a model without them is GPT-2 with zero biases). Checked by tests/test_export.py
# against transformers' logits for every combination.
EXPORT_FORMATS: dict[str, dict[str, tuple]] = {
    # GPT2LMHeadModel: learned table (the sinusoidal one is written into it); activation_function gelu,
    # gelu_pytorch_tanh or relu2
    "gpt2": {"positions": ("learned", "sinusoidal"), "norm": ("layernorm",), "mlp": ("gelu", "relu2"),
             "qk_norm": (False,)},
    # MptForCausalLM: the same ALiBi slopes, no biases anywhere (LayerNorm included), the exact GELU only
    "mpt": {"positions": ("alibi",), "bias": (False,), "norm": ("layernorm",), "mlp": ("gelu",),
            "activation": ("gelu",), "qk_norm": (False,)},
    # LlamaForCausalLM: RoPE in the same halves layout and base, RMSNorm, SwiGLU of the same width
    "llama": {"positions": ("rope",), "bias": (False,), "norm": ("rmsnorm",), "mlp": ("swiglu",), "qk_norm": (False,)},
    # Qwen3ForCausalLM: Llama with our QK-norm (an RMSNorm over each head's dimension, one gain shared by the heads)
    "qwen3": {"positions": ("rope",), "bias": (False,), "norm": ("rmsnorm",), "mlp": ("swiglu",), "qk_norm": (True,)},
}
EXPORT_NAMES = {"gpt2": "GPT-2", "mpt": "MPT", "llama": "Llama", "qwen3": "Qwen3"}


def _flag(setting: str, values: tuple) -> str:
    """The train.py flag that sets `setting` to one of `values`: --no-bias, --qk-norm, --mlp gelu|relu2."""
    name = "--" + setting.replace("_", "-")
    if isinstance(values[0], bool):
        return name if values[0] else "--no-" + name[2:]
    return f"{name} {'|'.join(values)}"


def _export_refusal(config: GPTConfig) -> str:
    """Why `config` exports as nothing: the first setting that differs from the format its positions export as
    (of two, the one with fewer differences), and the value that format takes."""
    candidates = [name for name, needs in EXPORT_FORMATS.items() if config.positions in needs["positions"]]
    if not candidates:
        setting, why = "positions", "no Hugging Face model type has these positions"
    else:
        def differences(name: str) -> list[str]:
            return [s for s, allowed in EXPORT_FORMATS[name].items() if getattr(config, s) not in allowed]

        name = min(candidates, key=lambda n: len(differences(n)))
        setting = differences(name)[0]
        why = (f"{config.positions} positions export as {EXPORT_NAMES[name]}, which takes "
               f"{_flag(setting, EXPORT_FORMATS[name][setting])}")
    return (f"cannot export a model trained with {_flag(setting, (getattr(config, setting),))}: {why} (the "
            f"README's section on exporting lists what exports as what)")


# A prompt longer than this many training contexts is cut to its last part for sinusoidal, ALiBi and RoPE models
# (sample.py), or refused (the server): they take any length, but reading it costs memory that grows with the
# square of its length, and these models are not measured beyond 8 contexts (BENCHMARKS.md) anyway. Learned
# positions see at most one context.
PROMPT_CONTEXTS = 8


def _default_model() -> GPTConfig:
    """The `python train.py` model: the shape that reached the lowest bits per byte in about two minutes on a
    2-core CPU (BENCHMARKS.md, "Retuning the default run"). Two layers beat three and four there: at this budget a
    smaller model's extra steps are worth more than its depth."""
    return GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64)


DEVICES = ("auto", "cpu", "cuda", "mps")
ATTENTION_CHOICES = ("auto",) + ATTENTION_KERNELS
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")
ERROR_MODES = ("strict", "replace", "ignore")  # as data.sources reads undecodable bytes
PATTERN_NAMES = ("gpt2", "gpt4")  # the tokenizer's named split patterns; a regex is accepted too
# The allowed values of every choice-valued setting (GPTConfig's and TrainConfig's): checked in __post_init__
# by _check_choice, listed by `train.py --help`.
CHOICES = {"positions": POSITION_KINDS, "norm": NORMS, "mlp": MLPS, "activation": ACTIVATIONS,
           "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "device": DEVICES, "dtype": DTYPES, "errors": ERROR_MODES, "pattern": PATTERN_NAMES,
           "attention": ATTENTION_CHOICES}
# What a choice setting accepts beyond its list (shown in --help and in the error).
OPEN_CHOICES = {"device": "cuda:N", "pattern": "a regex"}
MIN_TIME_BUDGET_S = 1.0  # a --max-time below this cannot even be measured (see stopping.TimeBudget)


@dataclass
class TrainConfig:
    """Everything `train.py` can be told; CLI flags are generated from these fields (and GPTConfig's).

    The model's vocab_size is not a setting here: it is taken from the tokenizer.
    """

    # data source (see data.prepare.prepare_data)
    data: str | None = field(default=None, metadata={"help": "text file, folder, glob, .jsonl or .parquet; default: the offline Python-stdlib corpus"})
    dataset: str | None = field(default=None, metadata={"help": "Hugging Face dataset name, or a builder such as json whose files --data gives"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hugging Face dataset configuration"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl/.parquet/datasets"})
    errors: str = field(default="strict", metadata={"help": "how to treat undecodable bytes"})
    tokenizer: str | None = field(default=None, metadata={"help": "an existing tokenizer instead of training one: a minigpt tokenizer .json, a Hugging Face tokenizer.json or folder, or a hub name such as gpt2"})
    init_from: str | None = field(default=None, metadata={"help": "finetune a pretrained GPT-2-family model: a Hugging Face folder or hub name (its shape and tokenizer are used)"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size of the tokenizer trained on the data"})
    pattern: str = field(default="gpt4", metadata={"help": "pre-tokenizer split pattern of the tokenizer trained on the data"})
    val_fraction: float = field(default=0.05, metadata={"help": "fraction of documents held out for validation"})
    max_bytes: int | None = field(default=None, metadata={"help": "read at most this many bytes of the corpus"})
    data_dir: str | None = field(default=None, metadata={"help": "token cache folder; default <out-dir>/data"})
    prepare_only: bool = field(default=False, metadata={"help": "prepare the tokens (and tokenizer) into --data-dir and stop; a run with the same data settings reuses them"})
    # the network
    model: GPTConfig = field(default_factory=_default_model)
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    total_batch_tokens: int | None = field(default=None, metadata={"help": "tokens per optimizer step (all processes); sets grad_accum = N / (batch size x block size x processes), which must divide evenly"})
    max_iters: int = field(default=1500, metadata={"help": "optimizer steps to train for (in total, across resumes); --max-time sets it"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "learning rate at the end of the decay; default --lr / 10"})
    warmup_iters: int = field(default=100, metadata={"help": "steps of linear warmup from 0 to --lr"})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "step where the decay reaches --min-lr; default --max-iters"})
    lr_schedule: str = field(default="cosine", metadata={"help": "after warmup: cosine|linear (decay to --min-lr), "
                                                                 "constant (--lr throughout), wsd (constant, then "
                                                                 "linear decay over the last --decay-fraction)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: fraction of the steps spent decaying to --min-lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    optimizer: str = field(default="adamw", metadata={"help": "Muon for the blocks' matrices (AdamW at --lr for the rest), or AdamW for all"})
    muon_lr: float = field(default=0.02, metadata={"help": "peak learning rate of Muon's matrices (with --optimizer muon); follows --lr's schedule"})
    label_smoothing: float = field(default=0.0, metadata={"help": "train against (1-e)*one-hot + e/vocab; evaluation "
                                                                  "always reports the plain loss"})
    max_time: str | None = field(default=None, metadata={"help": "time budget such as 90s, 10m or 1.5h: the run times "
                                                                 "its first steps, then sets --max-iters to end within "
                                                                 "it with the whole warmup + decay schedule"})
    # evaluation, logging, checkpoints
    eval_interval: int = field(default=250, metadata={"help": "evaluate and save a checkpoint every N steps"})
    eval_iters: int = field(default=20, metadata={"help": "batches per evaluation (train and val)"})
    log_interval: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    eval_choices: str | None = field(default=None, metadata={"help": "multiple-choice items (.jsonl: HellaSwag's ctx/endings/label, or context/choices/label) scored at every evaluation: acc and acc_norm"})
    patience: int | None = field(default=None, metadata={"help": "early stopping: stop after N evaluations in a row "
                                                                 "without a better validation loss (None = off)"})
    min_delta: float = field(default=0.0, metadata={"help": "early stopping: the validation loss must drop by more "
                                                            "than this to count as better"})
    out_dir: str = field(default="out", metadata={"help": "output folder for checkpoints, metrics and plots"})
    resume: bool = field(default=False, metadata={"help": "continue the run saved in --out-dir"})
    overwrite: bool = field(default=False, metadata={"help": "start a new run even if --out-dir holds a checkpoint"})
    # hardware
    device: str = field(default="auto", metadata={"help": "where to train; auto picks cuda, then mps, then cpu"})
    attention: str = field(default="auto", metadata={"help": "attention kernel: sdpa (torch's scaled_dot_product_"
                                                             "attention) or flex (FlexAttention; trains on CUDA "
                                                             "only); auto is flex for ALiBi on CUDA, else sdpa"})
    dtype: str = field(default="auto", metadata={"help": "auto is bfloat16 autocast on CUDA (float16 with loss scaling on GPUs without bfloat16), float32 elsewhere"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    peak_tflops: float | None = field(default=None, metadata={"help": "dense peak TFLOP/s of one device for the MFU (default: from the GPU's name and the dtype; none on CPU)"})
    seed: int = field(default=1337, metadata={"help": "seed for initialisation, dropout and batch sampling"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict(self.model)
        hints = get_type_hints(TrainConfig)
        for f in fields(self):  # an empty value unsets an optional setting: `--tokenizer ""` trains one after all
            if getattr(self, f.name) == "" and type(None) in get_args(hints[f.name]):
                setattr(self, f.name, None)
        for name in PATH_FIELDS:
            if isinstance(getattr(self, name), str):
                setattr(self, name, expand_path(getattr(self, name)))
        _check_types(self)
        for name in ("vocab_size", "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            _check_positive(name, getattr(self, name))
        for name in ("max_bytes", "lr_decay_iters", "patience", "total_batch_tokens"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for name in ("errors", "pattern", "device", "attention", "dtype", "optimizer", "lr_schedule"):
            _check_choice(name, getattr(self, name))
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not self.lr > 0.0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.muon_lr > 0.0:
            raise ConfigError(f"muon_lr must be > 0, got {self.muon_lr}")
        if self.min_lr is not None and not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be between 0 and --lr {self.lr}; give a --min-lr in "
                              f"that range, or none (it defaults to --lr / 10)")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_time is not None:
            if parse_duration(self.max_time) < MIN_TIME_BUDGET_S:
                raise ConfigError(f"max_time {self.max_time} is too short to plan a run in (timed steps, an evaluation "
                                  f"and a save come first); give at least {MIN_TIME_BUDGET_S:g}s, or --max-iters N")
            if self.lr_decay_iters is not None:
                raise ConfigError("give max_time or lr_decay_iters, not both: the time budget sets where the "
                                  "schedule ends")
        if self.peak_tflops is not None and not self.peak_tflops > 0.0:
            raise ConfigError(f"peak_tflops must be > 0 (the device's TFLOP/s), got {self.peak_tflops}")
        for name in ("weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0.0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.out_dir:
            raise ConfigError("out_dir must not be empty")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; give one")

    @property
    def final_lr(self) -> float:
        """Where the decay ends: --min-lr, or lr / 10 when not given, so that it follows a changed --lr."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def max_time_s(self) -> float | None:
        """The time budget in seconds (None: no budget)."""
        return None if self.max_time is None else parse_duration(self.max_time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return from_dict_strict(cls, values)


def with_batch_tokens(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with the grad_accum that --total-batch-tokens asks for on `world_size` processes (cfg itself without it):
    tokens per step = batch_size × block_size × grad_accum × world_size, so the total must be a multiple of the
    tokens one micro-step of all processes takes."""
    if cfg.total_batch_tokens is None:
        return cfg
    total, per_micro = cfg.total_batch_tokens, cfg.batch_size * cfg.model.block_size * world_size
    if total % per_micro:
        raise ConfigError(f"--total-batch-tokens {total:,} is not a multiple of --batch-size {cfg.batch_size} x "
                          f"--block-size {cfg.model.block_size} x {world_size} process(es) = {per_micro:,} tokens per "
                          f"micro-step; {_batch_size_hint(total, cfg.batch_size, cfg.model.block_size * world_size)}")
    return replace(cfg, grad_accum=total // per_micro)


def _batch_size_hint(total: int, batch_size: int, tokens_per_row: int) -> str:
    """The --batch-size values nearest to `batch_size` that divide the sequences of a step, or what to change."""
    if total % tokens_per_row:
        return f"give a --total-batch-tokens that is a multiple of {tokens_per_row:,} (block size x processes)"
    sequences = total // tokens_per_row
    below = max(b for b in range(1, min(batch_size, sequences) + 1) if sequences % b == 0)
    above = next((b for b in range(batch_size + 1, sequences + 1) if sequences % b == 0), None)
    choices = " or ".join(str(b) for b in (below, above) if b is not None)
    return f"use --batch-size {choices} (a divisor of the {sequences:,} sequences of a step)"


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m" or "1.5h"; anything else is a ConfigError that shows the accepted forms."""
    match = _DURATION.fullmatch(text)
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2].lower()] if match else 0.0
    if not seconds > 0:
        raise ConfigError(f"max_time must be a positive duration such as 90s, 10m or 1.5h (s, m or h; a bare "
                          f"number is seconds); got {text!r}")
    return seconds


def _check_types(obj: Any) -> None:
    """Refuse values of the wrong type (a config file can hold `lr = "fast"`); ints are accepted where floats are."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        allowed = tuple(t for t in get_args(hint)) if get_args(hint) else (hint,)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
            continue
        ok = any(value is None if t is type(None) else isinstance(value, t) for t in allowed)
        if not ok or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{f.name} must be {names}, got {value!r}")
