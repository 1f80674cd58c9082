"""A model ready to sample from, as sample.py and the server both load it: from a checkpoint folder or a
pretrained GPT-2-family model, on its device, in its precision, quantized or not, with its attention kernel.

One function, so that the two commands accept and refuse the same settings in the same words.
"""
from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenizer import Tokenizer

from .attention import choose_attention
from .device import autocast_dtype, resolve_device
from .errors import ConfigError
from .model import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]  # the checkpoint's config.json ({"model": ...} alone for a pretrained model)
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's dtype; None: float32
    parameters: int  # the model's, counted before int8 packs the Linear weights out of .parameters()
    compile: bool = False  # decode with the engine's compiled step (CUDA graphs on a GPU)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision to run the model in (a fresh context manager each call)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def load_for_inference(out_dir: str | None, init_from: str | None, device: str = "auto", dtype: str = "auto",
                       quantize: str | None = None, attention: str = "auto", compile: bool = False) -> LoadedModel:
    """The model of checkpoint folder `out_dir`, or of `init_from` (a Hugging Face folder or hub name), in eval
    mode; a ConfigError in one line for settings that cannot go together."""
    where = resolve_device(device)
    amp_dtype = autocast_dtype(dtype, where)
    if quantize is not None:  # checked before loading: a large model takes a while to read
        if where.type != "cpu":
            raise ConfigError(f"--quantize int8 is for CPU inference; add --device cpu (the device here is {where})")
        if amp_dtype is not None:
            raise ConfigError(f"--quantize int8 runs in float32; leave out --dtype {dtype}")
        if compile:
            raise ConfigError("--compile cannot compile an int8 model (torch.compile does not trace torch's "
                              "dynamic quantization); leave out --quantize or --compile")
    if init_from:
        from .hf import load_pretrained, load_tokenizer

        model = load_pretrained(init_from).to(where)
        tokenizer, config = load_tokenizer(init_from, model.config.vocab_size), {"model": model.config.to_dict()}
    else:
        from .checkpoint import load_model

        _refuse_hugging_face_folder(out_dir)
        model, tokenizer, config = load_model(out_dir, where)
    parameters = model.num_parameters()
    if quantize is not None:
        from .quantize import quantize_int8

        model = quantize_int8(model)
    model.attention = choose_attention(attention, model.config, where, training=False)
    return LoadedModel(model, tokenizer, config, where, amp_dtype, parameters, compile)


def _refuse_hugging_face_folder(out_dir: str) -> None:
    """A Hugging Face model folder (say, one minigpt.export wrote) given where a checkpoint of train.py goes: say
    that --init-from reads it, rather than that the checkpoint's manifest is missing."""
    from .checkpoint import CONFIG_FILE, MANIFEST_FILE

    folder = Path(out_dir)
    if (folder / MANIFEST_FILE).exists() or not (folder / CONFIG_FILE).is_file():
        return
    try:
        model_type = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not readable as a Hugging Face config: load_model says what is wrong
    if model_type:
        raise ConfigError(f"{out_dir} is a Hugging Face model folder ({model_type}), not a checkpoint written by "
                          f"train.py; load it with --init-from {shlex.quote(str(out_dir))}")
