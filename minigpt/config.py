"""Settings as dataclasses: the one place where defaults live and values are checked."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

POSITION_KINDS = ("learned", "sinusoidal", "alibi")


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
    positions: str = "alibi"  # "learned" | "sinusoidal" | "alibi"
    bias: bool = True  # biases in Linear layers and LayerNorms
    tie_weights: bool = True  # output head shares the token embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.positions not in POSITION_KINDS:
            raise ConfigError(f"positions must be one of {', '.join(POSITION_KINDS)}; got {self.positions!r}")
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        return from_dict_strict(cls, values)
