"""A GPT-2-style decoder, top-down: the GPT, then its blocks, then attention, then the KV cache.

    token ids ─► embedding (+ positions) ─► N × [x + attn(LN(x)); x + mlp(LN(x))] ─► LN ─► head ─► logits

Pre-LayerNorm blocks (normalise *before* each sub-layer, add the result to an untouched residual stream) are what
GPT-2 uses: the residual path stays an identity from input to output, which keeps deep stacks trainable without
warm-up tricks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GPTConfig
from .errors import ConfigError
from .positions import ALiBi, LearnedPositions, SinusoidalPositions

INIT_STD = 0.02  # GPT-2's standard deviation for weights and embeddings (and the sinusoids' scale, see positions.py)


class GPT(nn.Module):
    """Decoder-only transformer language model: ``logits, loss = model(idx, targets)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = _position_embedding(config)  # None for ALiBi: it works inside attention instead
        self.alibi = ALiBi(config.n_head) if config.positions == "alibi" else None
        self.drop = _dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix both reads tokens in and scores them out (Press & Wolf, 2017): fewer parameters, and
            # every output gradient also trains the input embedding.
            self.head.weight = self.wte.weight
        self.apply(_init_gpt2)
        # GPT-2: each block adds two sub-layer outputs to the residual stream, so its variance grows with depth;
        # scaling the projections that write into it by 1/sqrt(2 * n_layer) keeps the sum's variance near 1.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for every position, and the mean cross-entropy against `targets` when given.

        With label_smoothing ε the target is (1 − ε)·one-hot + ε/vocab instead of the one-hot (Szegedy et al.,
        2016): the loss no longer rewards pushing the right token's probability all the way to 1. It is a training
        objective only; evaluate.py always scores the plain negative log-likelihood.
        """
        check_token_ids(idx, self.config.vocab_size)
        logits = self.head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ConfigError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), label_smoothing=label_smoothing)
        return logits, loss

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """The final-LayerNorm output (B, T, n_embd) for `idx`, which continues whatever `cache` holds.

        The ids are not checked here (forward and generate check them once) so that a generation step stays cheap.
        """
        _, T = idx.shape
        start = cache.length if cache is not None else 0
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(start, T)
        x = self.drop(x)
        attn_mask, is_causal = self._attention_mask(T, start)
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, is_causal, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def _attention_mask(self, q_len: int, start: int) -> tuple[Tensor | None, bool]:
        """What SDPA needs to keep each query from seeing later keys: a mask, or its built-in causal flag.

        Queries are positions start..start+q_len-1 of start+q_len keys. SDPA's is_causal aligns the mask to the
        top-left corner, which is right only when there is no cached prefix; a single new query may see every key;
        anything else gets an explicit bottom-right mask. ALiBi always brings its own mask (bias + causal -inf).
        """
        k_len = start + q_len
        if self.alibi is not None:
            return self.alibi(q_len, k_len), False
        if start == 0:
            return None, True
        if q_len == 1:
            return None, False
        i = torch.arange(start, k_len, device=self.wte.weight.device)[:, None]
        return torch.arange(k_len, device=i.device)[None, :] <= i, False

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | int | None = None,
        stop_id: int | None = None,
    ) -> Tensor:
        """Continue each row of `idx` (B, T) by up to max_new_tokens sampled tokens; returns (B, T + new).

        Generation ends early when every row has emitted `stop_id`; rows that finish first are padded with
        stop_id. See minigpt.generate.generate_tokens for the sampling controls. Call model.eval() first if the
        model has dropout.
        """
        from .generate import generate_tokens  # generate.py builds on this module, so import at call time

        steps = list(generate_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                                     stop_id))
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1) if steps else idx.clone()

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `capacity` positions."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, capacity, c.n_embd // c.n_head)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once).

        non_embedding=True leaves out the token and position tables, the convention of scaling-law papers
        (Kaplan et al., 2020); an untied head is a real matmul and stays counted.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if isinstance(self.wpe, LearnedPositions):
                n -= self.wpe.table.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context seq_len: 6N + 12·n_layer·n_embd·seq_len.

        N counts the weights that take part in a matmul (every layer and the head, not the embedding lookups);
        each costs 2 FLOPs forward and 4 backward. The second term is attention's QK^T and AV over the full
        seq_len × seq_len score matrix, as in PaLM (Chowdhery et al., 2022, appendix B).
        """
        c = self.config
        tied_head = self.head.weight.numel() if self.head.weight is self.wte.weight else 0  # else counted already
        n_matmul = self.num_parameters(non_embedding=True) + tied_head
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len


class Block(nn.Module):
    """One transformer layer: attention mixes information across positions, the MLP transforms each position."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t only sees positions <= t.

    Q, K and V come from one fused projection (one large matmul instead of three small ones). The attention itself
    is torch's scaled_dot_product_attention, which scales by 1/sqrt(d_head). Causality comes from one of two
    places, both decided by `GPT._attention_mask`: SDPA's own `is_causal` flag (learned and sinusoidal positions
    without a cached prefix; the flash kernel on GPU), or an explicit mask that already holds -inf above the
    diagonal (ALiBi's bias, or queries that continue a KV cache). Every call gets one of the two.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_drop = _dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, H, T, d_head): views only; SDPA reads the strided layout directly.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if cache is None else (qkv[0], *cache.update(layer, qkv[1:]))
        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # under autocast q is half precision; SDPA wants matching types
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        # Heads side by side again: (B, H, T, d_head) -> (B, T, C).
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back.

    The exact (erf) GELU: GPT-2 used a tanh approximation because erf was slow in 2019 TensorFlow; in torch the
    exact form is the faster kernel (about 2x, forward + backward, on CPU).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = _dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class KVCache:
    """Keys and values of every layer for the positions generated so far.

    During generation the keys and values of past positions never change (for sinusoidal and ALiBi models, and
    for learned positions until the window slides), so each new token only computes its own and attends to the
    stored ones: one position of work per token instead of a re-run over the whole context. The buffers are
    allocated once for `capacity` positions, so appending writes one slot rather than copying the history.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, capacity: int, head_dim: int) -> None:
        # Keys and values side by side, so that one copy stores both. Allocated on first use, in the dtype the
        # keys actually have (half precision under autocast) and on their device.
        self.shape = (n_layer, 2, batch_size, n_head, capacity, head_dim)
        self.kv: Tensor | None = None
        self.capacity = capacity
        self.length = 0  # positions stored in every layer; GPT.hidden_states advances it after the last layer

    def update(self, layer: int, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys and values (2, B, H, T, d_head); return all keys and values so far."""
        end = self.length + kv.shape[3]
        if end > self.capacity:
            raise ConfigError(f"KV cache holds {self.capacity} positions; cannot add up to position {end}")
        if self.kv is None:
            self.kv = kv.new_empty(self.shape)
        stored = self.kv[layer]
        stored[:, :, :, self.length:end] = kv
        return stored[0, :, :, :end], stored[1, :, :, :end]

    def reset(self) -> None:
        """Forget every position (the buffers are reused)."""
        self.length = 0


def check_token_ids(idx: Tensor, vocab_size: int) -> None:
    """Refuse anything but a (B, T) integer tensor of ids in [0, vocab_size) with a message that says so."""
    if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"idx must be a (batch, time) int64 tensor with time >= 1; "
                          f"got shape {tuple(idx.shape)} dtype {idx.dtype}")
    low, high = torch.aminmax(idx)
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"token ids must be in [0, {vocab_size - 1}] (vocab_size={vocab_size}); "
                          f"got ids from {int(low)} to {int(high)}")


def _position_embedding(config: GPTConfig) -> nn.Module | None:
    if config.positions == "learned":
        return LearnedPositions(config.block_size, config.n_embd)
    if config.positions == "sinusoidal":
        return SinusoidalPositions(config.block_size, config.n_embd, scale=INIT_STD)
    return None


def _dropout(p: float) -> nn.Module:
    """nn.Dropout, or a plain pass-through when p = 0 (no random mask to draw in training).

    torch's dropout is *inverted* dropout: in training it zeroes each activation with probability p and scales
    the survivors by 1/(1 − p), so every activation keeps its expected value; at inference (model.eval()) it is
    the identity. The alternative, plain dropout, leaves the survivors as they are and must instead multiply the
    weights by (1 − p) at inference; inverted dropout keeps the trained network usable as it is. (Attention
    dropout, inside scaled_dot_product_attention, works the same way.)
    """
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _init_gpt2(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorms keep their ones and zeros)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
