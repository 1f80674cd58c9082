"""A decoding step of fixed shapes, compiled, so that a CUDA graph can replay it: the engine's `compile=True`.

At batch 1 a GPU computes each kernel of a decoding step in a few microseconds and waits about as long for
Python to launch the next one: GPT-2 124M launches a few hundred a token and decodes at the CPU's pace (2-3 ms a
token), not the GPU's. A CUDA graph records the kernels of one step once and replays them all with one launch.
It replays only what it recorded: the same kernels on the same shapes at the same addresses, with no decision
taken on the host from a value on the GPU. The engine's ordinary step breaks each rule: its rows come and go, it
reads each layer's keys up to the longest row (one more every step), and rows of equal lengths take a path of
their own. This step keeps everything fixed:

- every row of the cache, in use or not (a free row decodes token 0 at position 0, and its logits are dropped);
- the keys of the cache's whole capacity, each row masked to its own (attention.sdpa_mask with a tensor start);
- each row's position as a tensor, from which the new keys' place, the learned or sinusoidal position vectors,
  RoPE's angles and ALiBi's bias are all computed on the device (positions.py: no lookup that checks a value).

torch.compile makes one graph of it per cache shape, with no graph break and no recompilation as the positions
advance (tests/test_static_step.py counts them); mode "reduce-overhead" on CUDA records that graph as a CUDA graph
and replays it. The cache's buffer is a static address: the graph writes the new keys into it in place, where
the eager prefills (whose shapes change with every prompt) put theirs. Elsewhere (a CPU) the step is compiled
by inductor, with no graph to replay.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from .kv_cache import KVCache
from .model import GPT

# The engine grows a compiled cache in powers of two from here: each new capacity is a new graph to compile.
MIN_CAPACITY = 256

# Cache buffers that no engine uses any more, one per (shape, dtype, device). A new engine's cache moves into the
# one of its shape, so that the CUDA graphs recorded on that address replay, instead of being recorded again for
# every engine (GPT.generate makes one per call) and piling up. At most MAX_SPARE_BUFFERS are kept, the least
# recently given back dropped first: a process that goes through many shapes (batch sizes, capacities) holds a
# few caches' memory, not one per shape for its whole life; a dropped shape's next engine records its graph anew.
MAX_SPARE_BUFFERS = 4
_spare_buffers: OrderedDict[tuple, Tensor] = OrderedDict()


class StaticRows:
    """The KV cache as the fixed-shape step sees it: each layer's keys and values (rows, H, capacity, d_head), all
    rows, the whole capacity, and each row's position (rows,). Answers what GPT.hidden_states asks of a KVCache.

    The layers come as separate tensors, not as the cache's one buffer: torch.compile writes into a tensor that
    is an input of the graph in place, but into a view of one (`kv[layer]`) by copying the whole buffer."""

    def __init__(self, layers: list[Tensor], positions: Tensor) -> None:
        self.layers = layers  # keys of layer 0, values of layer 0, keys of layer 1, ...
        self.length = positions  # where each row's next position goes

    def key_count(self, new: int) -> int:
        return self.layers[0].shape[2]  # every row reads the whole capacity; its mask keeps it to its own keys

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.layers[2 * layer], self.layers[2 * layer + 1]
        KVCache.write_rows(keys, values, self.length, k, v)
        return keys, values

    def advance(self, n: int) -> None:
        """Nothing: the engine counts the positions on the host (KVCache.advance)."""


def _step(model: GPT, layers: list[Tensor], idx: Tensor, positions: Tensor) -> Tensor:
    """Logits (rows, vocab) of one position for every row of the cache: the function that is compiled."""
    hidden = model.hidden_states(idx, StaticRows(layers, positions))
    return model.head(hidden[:, -1])


class StaticStep:
    """One decoding step of a model's running rows through the compiled fixed-shape step.

    torch.compile keeps what it compiled with the function, so every engine of a process (one per GPT.generate
    call) reuses the graphs of the first; the first step of each cache shape waits for the compilation. The cache
    buffer is one of `_spare_buffers` where one is free, and goes back there when it grows or the step is dropped.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.cuda_graphs = model.wte.weight.device.type == "cuda"
        self.compiled = torch.compile(_step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if self.cuda_graphs else None)
        self._buffer: Tensor | None = None  # the cache buffer that `_layers` are views of
        self._layers: list[Tensor] = []
        self._release: weakref.finalize | None = None  # gives `_buffer` back to the spares

    def __call__(self, cache: KVCache, tokens: list[int]) -> Tensor:
        """Logits (len(tokens), vocab) after feeding running row r its token tokens[r] at position
        cache.lengths[r]; the cache counts one more position in each row."""
        rows, lengths = len(tokens), list(cache.lengths)
        if max(lengths) >= cache.capacity:  # past the end, a write on the GPU would fail without a word
            raise RuntimeError(f"KV cache holds {cache.capacity} positions; a row already has {max(lengths)}")
        if cache.kv is not self._buffer:  # a new cache, or one grown
            self._adopt(cache)
        free = [0] * (cache.shape[2] - rows)
        inputs = torch.tensor([tokens + free, lengths + free], device=cache.kv.device)  # one copy to the device
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are no longer read
        logits = self.compiled(self.model, self._layers, inputs[0, :, None], inputs[1])
        cache.advance(1)
        return logits[:rows].clone()  # the graph's output memory is overwritten by the next replay

    def _adopt(self, cache: KVCache) -> None:
        """Move the cache into a spare buffer of its shape if there is one; take views of each layer's keys and
        values, marked as static addresses (written in place: a CUDA graph keeps their addresses)."""
        if self._release is not None:
            self._release()  # the old buffer: the cache grew out of it, or was dropped (Engine.clear)
        key = (tuple(cache.kv.shape), cache.kv.dtype, cache.kv.device)
        spare = _spare_buffers.pop(key, None)
        if spare is not None:
            cache.kv = spare.copy_(cache.kv)
        self._buffer = cache.kv
        self._layers = [cache.kv[layer, kind] for layer in range(cache.kv.shape[0]) for kind in (0, 1)]
        for tensor in self._layers:
            torch._dynamo.mark_static_address(tensor)
        self._release = weakref.finalize(self, _give_back, key, cache.kv)


def _give_back(key: tuple, buffer: Tensor) -> None:
    """Keep `buffer` as the spare of its shape, dropping the least recently given back beyond MAX_SPARE_BUFFERS."""
    _spare_buffers[key] = buffer
    _spare_buffers.move_to_end(key)
    while len(_spare_buffers) > MAX_SPARE_BUFFERS:
        _spare_buffers.popitem(last=False)
