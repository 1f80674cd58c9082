"""A GPT-2-style decoder, top-down: the GPT, then its blocks, then attention, then the MLP.

    token ids ─► embedding (+ positions) ─► N × [x + attn(LN(x)); x + mlp(LN(x))] ─► LN ─► head ─► logits

Pre-LayerNorm blocks (normalise *before* each sub-layer, add the result to an untouched residual stream) are what
GPT-2 uses: the residual path stays an identity from input to output, which keeps deep stacks trainable without
warm-up tricks.

That is the default. Later models changed a few pieces, each a switch of GPTConfig that lives where its concept
does: rotary positions (`positions="rope"`, in attention), RMSNorm for LayerNorm (`norm`, in `_norm`), SwiGLU or
squared-ReLU MLPs (`mlp`, in MLP), and normalised queries and keys (`qk_norm`, in attention).

Generation keeps every layer's past keys and values in a KV cache (kv_cache.py), so that `hidden_states` continues
a text with one position of work per new token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import BlockMasks, FlexMask, SdpaMask, flex_attention, flex_mask, sdpa_mask
from .config import ATTENTION_KERNELS, GPTConfig
from .errors import ConfigError
from .kv_cache import KVCache
from .positions import ALiBi, LearnedPositions, RotaryPositions, SinusoidalPositions, rotate

INIT_STD = 0.02  # GPT-2's standard deviation for weights and embeddings (and the sinusoids' scale, see positions.py)
NORM_EPS = 1e-5  # added to the variance (or mean square) before the square root, as in GPT-2's LayerNorm


class GPT(nn.Module):
    """Decoder-only transformer language model: ``logits, loss = model(idx, targets)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = _position_embedding(config)  # None for ALiBi: it works inside attention instead
        self.alibi = ALiBi(config.n_head) if config.positions == "alibi" else None
        head_dim = config.n_embd // config.n_head
        self.rope = RotaryPositions(config.block_size, head_dim) if config.positions == "rope" else None
        self.drop = _dropout(config.dropout)
        self.attention = "sdpa"  # which kernel computes attention (the property below)
        self.block_masks = BlockMasks()  # FlexAttention's, one per shape
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
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

    @classmethod
    def from_pretrained(cls, name_or_path: str, block_size: int | None = None, dropout: float = 0.0) -> "GPT":
        """A GPT-2-family model in Hugging Face layout: a folder, or a hub name such as "gpt2" (see hf.py)."""
        from .hf import load_pretrained

        return load_pretrained(name_or_path, block_size, dropout)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for every position, and the mean cross-entropy against `targets` when given.

        With label_smoothing ε the target is (1 − ε)·one-hot + ε/vocab instead of the one-hot (Szegedy et al.,
        2016): the loss no longer rewards pushing the right token's probability all the way to 1. It is a training
        objective only; evaluate.py always scores the plain negative log-likelihood.
        """
        if not torch.compiler.is_compiling():
            # Compiled, this branch on tensor values would split the graph and wait for the GPU at every call; a
            # compiled model is the trainer's, whose ids come from its own tokenizer.
            check_token_ids(idx, self.config.vocab_size)
        logits = self.head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ConfigError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), label_smoothing=label_smoothing)
        return logits, loss

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """The final norm's output (B, T, n_embd) for `idx`, which continues whatever `cache` holds.

        The ids are not checked here (forward and generate check them once) so that a generation step stays cheap.
        """
        _, T = idx.shape
        start = cache.length if cache is not None else 0  # an int, or (B,) when rows hold different lengths
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(start, T)
        x = self.drop(x)
        mask = self._attention_mask(T, start, cache.key_count(T) if cache is not None else T)
        rope = self.rope(start, T) if self.rope is not None else None  # the angles of these absolute positions
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, rope)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    @property
    def attention(self) -> str:
        """Which kernel computes attention, "sdpa" or "flex" (attention.choose_attention picks it): a runtime choice
        like the device, so not a config field; every kernel computes the same function of the weights."""
        return self._attention

    @attention.setter
    def attention(self, kernel: str) -> None:
        if kernel not in ATTENTION_KERNELS:
            raise ConfigError(f"GPT.attention must be one of {', '.join(ATTENTION_KERNELS)}; got {kernel!r}")
        self._attention = kernel

    def _attention_mask(self, q_len: int, start: int | Tensor, k_len: int) -> SdpaMask | FlexMask:
        """What keeps each query (positions start..start+q_len-1) from seeing later keys of the k_len keys, with
        ALiBi's bias, in the form the attention kernel takes (attention.py). A decoding step (one query) keeps SDPA
        under flex, as do the rows of a KV cache that hold different lengths (`start` a tensor, one per row)."""
        device = self.wte.weight.device
        if self.attention == "flex" and q_len > 1 and not isinstance(start, Tensor):
            return flex_mask(q_len, start, self.alibi, self.block_masks, device)
        return sdpa_mask(q_len, start, k_len, self.alibi, device)

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
        compile: bool = False,
    ) -> Tensor:
        """Continue each row of `idx` (B, T) by up to max_new_tokens sampled tokens; returns (B, T + new).

        Generation ends early when every row has emitted `stop_id`; rows that finish first are padded with
        stop_id. See minigpt.generate.generate_tokens for the sampling controls. Call model.eval() first if the
        model has dropout.
        """
        from .generate import generate_tokens  # generate.py builds on this module, so import at call time

        steps = list(generate_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                                     stop_id, compile=compile))
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1) if steps else idx.clone()

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache (kv_cache.py) for `batch_size` sequences of up to `capacity` positions."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, capacity, c.n_embd // c.n_head, self.wte.weight.device)

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
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: SdpaMask | FlexMask, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t only sees positions <= t.

    Q, K and V come from one fused projection (one large matmul instead of three small ones). The attention itself
    is one fused kernel that scales by 1/sqrt(d_head): torch's scaled_dot_product_attention, or FlexAttention
    (`GPT.attention`; attention.py says which runs where). For SDPA, causality comes from its own `is_causal` flag
    (no ALiBi, no cached prefix: the flash kernel on GPU) or from an explicit mask that already holds -inf above
    the diagonal (ALiBi's bias, or queries that continue a KV cache). FlexAttention takes ALiBi's bias as a
    function of each score's position and skips the tiles above the diagonal.

    Two switches act on the queries and keys before their dot product. QK-norm (`qk_norm`; Henry et al., 2020,
    here as RMSNorm with a learned gain per channel, as in OLMo 2 and Qwen 3) gives every query and key the same
    RMS, so a score can only grow through the learned gains and no longer through weights that drift large: a
    guard against attention logits that blow up. RoPE (`positions="rope"`) then rotates each query and key by
    the angles of its absolute position; the cache stores keys already rotated, which never need to change.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        head_dim = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if config.qk_norm else None
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_drop = _dropout(config.dropout)

    def forward(self, x: Tensor, mask: SdpaMask | FlexMask, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, H, T, d_head): views only; SDPA reads the strided layout directly.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            # In float32 (autocast would hand half-precision q and k to float32 gains), then back to v's dtype.
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(mask, FlexMask):  # no dropout here: attention.choose_attention refuses it in training
            y = flex_attention(q, k, v, mask)
        else:
            bias = mask.bias
            if bias is not None and bias.dtype != torch.bool and bias.dtype != q.dtype:
                bias = bias.to(q.dtype)  # under autocast q is half precision; SDPA wants matching types
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=mask.is_causal,
                                               dropout_p=self.attn_dropout if self.training else 0.0)
        # Heads side by side again: (B, H, T, d_head) -> (B, T, C).
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, a non-linearity, project back. Three kinds (`mlp`):

    - ``gelu`` (GPT-2): widen 4x, GELU. The exact (erf) GELU by default: GPT-2 used a tanh approximation because
      erf was slow in 2019 TensorFlow; in torch the exact form is the faster kernel (about 2x, forward + backward,
      on CPU). ``activation="gelu_tanh"`` is GPT-2's approximation, which its pretrained weights were trained with.
    - ``relu2``: widen 4x, relu(h)² (So et al., 2021, "Primer"; used by modded-nanogpt and nanochat): as cheap as
      ReLU, but smooth at 0 and with a sparse output.
    - ``swiglu`` (Shazeer, 2020; LLaMA): two projections of the input, one gating the other, silu(gate) · value.
      Three matrices instead of two, so the hidden width is cut to floor(8·n_embd / 3) to keep the parameter
      count of the 4x MLP: 3·n_embd·hidden weights against 8·n_embd², equal when 3 divides n_embd and otherwise
      n_embd or 2·n_embd fewer (128 fewer of 131,072 at n_embd 128). Value and gate come from one fused matmul.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = 8 * config.n_embd // 3 if self.kind == "swiglu" else 4 * config.n_embd
        widened = 2 * hidden if self.kind == "swiglu" else hidden  # swiglu: value and gate side by side
        self.fc = nn.Linear(config.n_embd, widened, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.drop = _dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            value, gate = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.drop(self.proj(h))


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


def _norm(config: GPTConfig) -> nn.Module:
    """The normalisation before each sub-layer and at the end: LayerNorm (GPT-2) or RMSNorm.

    LayerNorm centres each vector (subtracts its mean), scales it to unit variance, then applies a gain and a
    bias. RMSNorm (Zhang & Sennrich, 2019) skips the centring and the bias: x / sqrt(mean(x²) + eps) · gain.
    Re-scaling turns out to be what matters; RMSNorm does it with one reduction instead of two.
    """
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


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
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (norms keep their ones and zeros)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
