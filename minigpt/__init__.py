"""minigpt: a small GPT-2-style language model, its training and its sampling.

`GPT` is imported on first use, so `import minigpt.config` (or the error types) does not pay for importing torch.
"""
from .config import GPTConfig
from .errors import CheckpointError, ConfigError, MinigptError

__all__ = ["GPT", "GPTConfig", "ConfigError", "CheckpointError", "MinigptError"]


def __getattr__(name: str):
    if name == "GPT":
        from .model import GPT

        return GPT
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
