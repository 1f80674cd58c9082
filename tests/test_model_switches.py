"""The modern switches of the model (RoPE, RMSNorm, SwiGLU, ReLU², QK-norm) against slow, written-out references."""
from __future__ import annotations

import cmath
import math

import pytest
import torch

from minigpt import GPTConfig
from minigpt.config import TrainConfig
from minigpt.errors import ConfigError
from minigpt.positions import RotaryPositions, rotate

from helpers import tiny

ATTENTION_SWITCHES = [dict(positions="rope"), dict(qk_norm=True), dict(positions="rope", qk_norm=True),
                      dict(positions="alibi", qk_norm=True)]
EVERY_SWITCH = dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)
MODEL_SWITCHES = [dict(positions="rope"), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(mlp="relu2"),
                  dict(qk_norm=True), dict(positions="learned", qk_norm=True), EVERY_SWITCH,
                  dict(EVERY_SWITCH, mlp="relu2", bias=False)]


# ---------------------------------------------------------------- slow references, one formula at a time


def rope_reference(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """RoPE as complex numbers (Su et al., 2021, section 3.4.2): pair k of the vector at position t is the complex
    number x_k + i·x_{k+d/2}, multiplied by e^{i·t·θ_k} with θ_k = 10000^(-2k/d). Element by element, in float64."""
    *_, T, d = x.shape
    out = x.detach().double().clone()
    flat_in, flat_out = x.detach().double().reshape(-1, T, d), out.view(-1, T, d)
    for row in range(flat_in.shape[0]):
        for i, t in enumerate(positions):
            for k in range(d // 2):
                z = complex(flat_in[row, i, k], flat_in[row, i, k + d // 2]) * cmath.exp(1j * t * 10000 ** (-2 * k / d))
                flat_out[row, i, k], flat_out[row, i, k + d // 2] = z.real, z.imag
    return out


def rms_norm_reference(x: torch.Tensor, gain: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * gain


def norm_reference(module, x: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    if cfg.norm == "rmsnorm":
        return rms_norm_reference(x, module.weight)
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + 1e-5) * module.weight
    return out + module.bias if module.bias is not None else out


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def mlp_reference(mlp, x: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    h = linear(x, mlp.fc)
    if cfg.mlp == "swiglu":  # the first half of fc's outputs is the value, the second half the gate
        hidden = h.shape[-1] // 2
        value, gate = h[..., :hidden], h[..., hidden:]
        h = gate / (1 + torch.exp(-gate)) * value  # silu(g) = g·sigmoid(g)
    elif cfg.mlp == "relu2":
        h = torch.where(h > 0, h * h, torch.zeros_like(h))
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return linear(h, mlp.proj)


def attention_reference(attn, x: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Head by head with an explicit score matrix; QK-norm, then RoPE by the complex reference; learned or rope."""
    B, T, C = x.shape
    H, D = cfg.n_head, C // cfg.n_head
    q, k, v = linear(x, attn.qkv).split(C, dim=-1)
    heads = []
    for h in range(H):
        qh, kh, vh = (t[..., h * D:(h + 1) * D] for t in (q, k, v))
        if cfg.qk_norm:
            qh, kh = rms_norm_reference(qh, attn.q_norm.weight), rms_norm_reference(kh, attn.k_norm.weight)
        if cfg.positions == "rope":
            qh, kh = rope_reference(qh, list(range(T))).float(), rope_reference(kh, list(range(T))).float()
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)
        if cfg.positions == "alibi":
            slopes = [2.0 ** (-8.0 * (i + 1) / H) for i in range(H)]  # H is a power of two here
            scores = scores - slopes[h] * (torch.arange(T)[:, None] - torch.arange(T)[None, :])
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return linear(torch.cat(heads, dim=-1), attn.proj)


def forward_reference(model, idx: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    x = model.wte.weight[idx]
    if cfg.positions == "learned":
        x = x + model.wpe.table.weight[:idx.shape[1]]
    for block in model.blocks:
        x = x + attention_reference(block.attn, norm_reference(block.ln_1, x, cfg), cfg)
        x = x + mlp_reference(block.mlp, norm_reference(block.ln_2, x, cfg), cfg)
    return norm_reference(model.ln_f, x, cfg) @ model.head.weight.T


def prompt(batch=2, length=16, seed=0):
    return torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the model against the references


@pytest.mark.parametrize("switches", MODEL_SWITCHES, ids=str)
def test_forward_equals_slow_reference(switches):
    model = tiny(**{"positions": "learned", **switches})
    with torch.no_grad():  # the norms' gains and biases start at 1 and 0: move them so that they are tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    idx = prompt(length=11)
    torch.testing.assert_close(model(idx)[0], forward_reference(model, idx), atol=2e-5, rtol=1e-4)


def test_rope_model_runs_past_block_size_at_absolute_positions():
    model = tiny("rope", block_size=8, qk_norm=True)
    idx = prompt(length=20)
    torch.testing.assert_close(model(idx)[0], forward_reference(model, idx), atol=2e-5, rtol=1e-4)


def test_rotation_equals_the_complex_reference_before_and_past_the_table():
    rope = RotaryPositions(block_size=16, head_dim=8)
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(1))
    for start in (0, 11, 1000):  # inside, across and far past the precomputed rows
        got = rotate(x, *rope(start, 5))
        torch.testing.assert_close(got.double(), rope_reference(x, list(range(start, start + 5))), atol=1e-5, rtol=0)
    assert torch.equal(rotate(x, *rope(0, 5))[..., 0, :], x[..., 0, :])  # position 0: no rotation


def test_rope_score_depends_only_on_the_distance():
    """q at position i and k at position j score q_i·k_j = f(q, k, i - j), at any absolute offset."""
    rope = RotaryPositions(block_size=16, head_dim=16)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)

    def score(i, j):
        qi = rotate(q[None, :], *rope(i, 1))[0]
        kj = rotate(k[None, :], *rope(j, 1))[0]
        return (qi.double() @ kj.double()).item()

    for distance in (0, 1, 5, 13):
        scores = [score(j + distance, j) for j in (0, 3, 10, 40, 500)]
        assert max(scores) - min(scores) < 1e-4, (distance, scores)
    assert abs(score(5, 0) - score(6, 0)) > 1e-2  # and the distance does matter
    torch.testing.assert_close(rotate(q[None, :], *rope(7, 1)).norm(), q.norm())  # a rotation keeps lengths


def test_rmsnorm_module_is_the_formula():
    model = tiny("alibi", norm="rmsnorm")
    x = torch.randn(3, 5, 32) * 4 + 1
    with torch.no_grad():
        model.ln_f.weight.uniform_(0.5, 2.0)
        torch.testing.assert_close(model.ln_f(x), rms_norm_reference(x, model.ln_f.weight), atol=1e-5, rtol=1e-5)
    assert not hasattr(model.ln_f, "bias") or model.ln_f.bias is None  # no centring, no bias


# ---------------------------------------------------------------- sizes


def test_swiglu_keeps_the_parameter_count_of_the_4x_mlp():
    """hidden = floor(8C/3): 3·C·hidden weights against 8·C²; equal when 3 divides C, else C or 2C fewer."""
    for n_embd, fewer in ((48, 0), (32, 32), (40, 80)):
        gelu, swiglu = (tiny("alibi", n_embd=n_embd, bias=False, mlp=m) for m in ("gelu", "swiglu"))
        assert swiglu.blocks[0].mlp.proj.in_features == 8 * n_embd // 3
        assert gelu.num_parameters() - swiglu.num_parameters() == 2 * fewer  # 2 layers
        assert gelu.flops_per_token(16) - swiglu.flops_per_token(16) == 6 * 2 * fewer
    relu2 = tiny("alibi", mlp="relu2")
    assert relu2.num_parameters() == tiny("alibi").num_parameters()


def test_norms_and_qk_norm_change_the_count_by_their_gains_and_biases():
    base = tiny("alibi")  # 2 layers, 32 wide, 4 heads of 8
    assert base.num_parameters() - tiny("alibi", norm="rmsnorm").num_parameters() == (2 * 2 + 1) * 32  # no biases
    assert tiny("alibi", qk_norm=True).num_parameters() - base.num_parameters() == 2 * 2 * 8  # q and k gains
    assert tiny("rope").num_parameters() == base.num_parameters()  # rotations have no parameters


# ---------------------------------------------------------------- the KV cache with switches that change attention


@pytest.mark.parametrize("switches", ATTENTION_SWITCHES, ids=str)
def test_cached_logits_equal_full_forward_past_block_size(switches):
    model = tiny(**{"positions": "alibi", **switches}, block_size=8)
    idx = prompt(length=20)
    cache = model.new_cache(2, 20)
    with torch.no_grad():  # a prefill, a chunk on top of the cache, then single steps
        parts = [model.head(model.hidden_states(idx[:, a:b], cache)) for a, b in ((0, 6), (6, 13))]
        parts += [model.head(model.hidden_states(idx[:, t:t + 1], cache)) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", ATTENTION_SWITCHES + [EVERY_SWITCH], ids=str)
def test_greedy_with_and_without_cache_is_identical(switches):
    model = tiny(**{"positions": "alibi", **switches})
    idx = prompt(length=5)
    with_cache = model.generate(idx, 30, temperature=0, use_cache=True)  # 35 tokens > block_size 16
    assert torch.equal(with_cache, model.generate(idx, 30, temperature=0, use_cache=False))


def test_switches_work_under_bfloat16_autocast():
    """Autocast computes norms in float32 and matmuls in bfloat16; rotations and QK-norm keep SDPA's inputs alike."""
    model = tiny(**EVERY_SWITCH)
    idx = prompt(length=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.generate(idx, 8, temperature=0, use_cache=True).shape == (2, 13)
        logits, loss = model.train()(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.q_norm.weight.grad is not None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("values, words", [
    (dict(positions="rotary"), ["positions must be one of", "rope"]),
    (dict(norm="batchnorm"), ["norm must be one of", "layernorm, rmsnorm"]),
    (dict(mlp="geglu"), ["mlp must be one of", "gelu, swiglu, relu2"]),
    (dict(positions="rope", n_embd=36, n_head=4), ["head dimension", "9", "must be even"]),
])
def test_bad_model_switches_are_one_line_errors(values, words):
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ConfigError) as error:
        GPTConfig(**{**base, **values})
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("values, words", [
    (dict(optimizer="sgd"), ["optimizer must be one of", "adamw, muon"]),
    (dict(muon_lr=0.0), ["muon_lr must be > 0"]),
])
def test_bad_optimizer_settings_are_one_line_errors(values, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**values)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_every_switch_is_a_flag():
    import train as train_cli

    cfg = train_cli.make_config(["--positions", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--qk-norm",
                                 "--optimizer", "muon", "--muon-lr", "0.01"])
    assert (cfg.model.positions, cfg.model.norm, cfg.model.mlp, cfg.model.qk_norm) == ("rope", "rmsnorm", "swiglu", True)
    assert (cfg.optimizer, cfg.muon_lr) == ("muon", 0.01)
    default = train_cli.make_config([])
    assert (default.model.norm, default.model.mlp, default.model.qk_norm, default.optimizer) == \
        ("layernorm", "gelu", False, "adamw")
