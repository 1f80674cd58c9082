"""The GPT decoder against slow, written-out references: attention, positions, sizes, initialisation, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.errors import ConfigError
from minigpt.model import INIT_STD
from minigpt.positions import ALiBi, alibi_mask, alibi_slopes, sinusoidal_table

from helpers import KINDS, tiny

# ---------------------------------------------------------------- a slow reference forward pass, written out


def paper_alibi_slope(n_head: int, h: int) -> float:
    """Slope of head h (0-based), Press et al. 2022: 2^(-8(h+1)/n) for n a power of two, else interleaved."""
    if n_head & (n_head - 1) == 0:
        return 2.0 ** (-8.0 * (h + 1) / n_head)
    base = 2 ** (n_head.bit_length() - 1)
    if h < base:
        return 2.0 ** (-8.0 * (h + 1) / base)
    return 2.0 ** (-8.0 * (2 * (h - base) + 1) / (2 * base))  # the odd-numbered slopes of 2*base heads


def reference_attention(attn, x: torch.Tensor, alibi: bool) -> torch.Tensor:
    """Head by head, with an explicit score matrix, -inf causal mask and softmax."""
    B, T, C = x.shape
    H = attn.n_head
    D = C // H
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    heads = []
    for h in range(H):
        qh, kh, vh = (t[..., h * D:(h + 1) * D] for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)
        for i in range(T):
            for j in range(T):
                if j > i:
                    scores[:, i, j] = float("-inf")
                elif alibi:
                    scores[:, i, j] -= paper_alibi_slope(H, h) * (i - j)
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    T = idx.shape[1]
    x = model.wte.weight[idx]
    if cfg.positions == "learned":
        x = x + model.wpe.table.weight[:T]
    elif cfg.positions == "sinusoidal":
        x = x + INIT_STD * closed_form_sinusoid(T, cfg.n_embd)
    for block in model.blocks:
        ln = lambda m, t: F.layer_norm(t, (cfg.n_embd,), m.weight, m.bias)  # noqa: E731
        x = x + reference_attention(block.attn, ln(block.ln_1, x), cfg.positions == "alibi")
        hdn = ln(block.ln_2, x) @ block.mlp.fc.weight.T + block.mlp.fc.bias
        gelu = 0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2)))
        x = x + gelu @ block.mlp.proj.weight.T + block.mlp.proj.bias
    x = F.layer_norm(x, (cfg.n_embd,), model.ln_f.weight, model.ln_f.bias)
    return x @ model.wte.weight.T


def closed_form_sinusoid(length: int, dim: int, start: int = 0) -> torch.Tensor:
    rows = []
    for t in range(start, start + length):
        row = []
        for k in range(dim // 2):
            angle = t / 10000 ** (2 * k / dim)
            row += [math.sin(angle), math.cos(angle)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("positions", KINDS)
def test_forward_equals_slow_reference(positions):
    model = tiny(positions)
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, reference_forward(model, idx), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["sinusoidal", "alibi"])
def test_forward_equals_reference_beyond_block_size(positions):
    model = tiny(positions, block_size=8)
    idx = torch.randint(0, 37, (1, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(idx)[0], reference_forward(model, idx), atol=2e-5, rtol=1e-4)


def test_loss_is_mean_cross_entropy():
    model = tiny("alibi")
    idx = torch.randint(0, 37, (3, 9))
    targets = torch.randint(0, 37, (3, 9))
    logits, loss = model(idx, targets)
    expected = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_is_cross_entropy_against_the_smoothed_target(eps):
    """Closed form: -sum_k q_k log p_k with q = (1 - eps) one-hot + eps / V, in float64 from the model's logits."""
    model = tiny("alibi")
    idx, targets = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 7))
    with torch.no_grad():
        logits, loss = model(idx, targets, label_smoothing=eps)
        plain = float(model(idx, targets)[1])
    logp = torch.log_softmax(logits.double(), -1)
    q = torch.full_like(logp, eps / 37)
    q.scatter_add_(-1, targets[..., None], torch.full(targets[..., None].shape, 1 - eps, dtype=torch.float64))
    assert float(q.sum(-1).min()) == pytest.approx(1.0)
    torch.testing.assert_close(loss.double(), -(q * logp).sum(-1).mean(), rtol=1e-6, atol=1e-6)
    assert (float(loss) == pytest.approx(plain, abs=1e-7)) == (eps == 0)  # smoothing changes the loss


def test_label_smoothing_of_uniform_logits_is_log_vocab():
    """Uniform predictions cost log V against any target distribution: smoothing cannot change that."""
    model = tiny("alibi")
    torch.nn.init.zeros_(model.head.weight)  # tied: the embedding is zero too, so every logit is 0
    idx = torch.randint(0, 37, (2, 5))
    with torch.no_grad():
        for eps in (0.0, 0.3):
            assert float(model(idx, idx, label_smoothing=eps)[1]) == pytest.approx(math.log(37), rel=1e-6)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("positions", KINDS)
def test_later_tokens_never_change_earlier_logits(positions):
    model = tiny(positions)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 37, (2, 16), generator=gen)
    base = model(idx)[0]
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 37, changed[:, t + 1:].shape, generator=gen)
        logits = model(changed)[0]
        torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:])  # the change did reach later positions


# ---------------------------------------------------------------- positions


def test_sinusoid_table_is_the_closed_form():
    torch.testing.assert_close(sinusoidal_table(50, 16), closed_form_sinusoid(50, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(sinusoidal_table(5, 16, start=1000), closed_form_sinusoid(5, 16, 1000),
                               atol=1e-6, rtol=0)
    assert sinusoidal_table(1, 8)[0].tolist() == [0.0, 1.0] * 4


def test_sinusoidal_model_uses_absolute_positions_past_its_table():
    model = tiny("sinusoidal", block_size=8)
    torch.testing.assert_close(model.wpe(6, 6), INIT_STD * closed_form_sinusoid(6, 32, start=6), atol=1e-8, rtol=0)
    torch.testing.assert_close(model.wpe(0, 6), INIT_STD * closed_form_sinusoid(6, 32), atol=1e-8, rtol=0)


def test_alibi_slopes_are_the_papers():
    # Press et al. 2022, section 3 and their reference code: geometric with ratio 2^(-8/n) for n = 2^k heads;
    # 6 heads = the 4-head slopes + slopes 1 and 3 (0-based: 0 and 2) of the 8-head set; 12 = 8-head + odd of 16.
    expected = {
        4: [2**-2, 2**-4, 2**-6, 2**-8],
        8: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8],
        6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
        12: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    }
    for n_head, slopes in expected.items():
        torch.testing.assert_close(alibi_slopes(n_head), torch.tensor(slopes), rtol=1e-6, atol=0)
        assert [paper_alibi_slope(n_head, h) for h in range(n_head)] == pytest.approx(slopes)


def test_alibi_mask_is_minus_slope_times_distance_below_the_diagonal():
    slopes = alibi_slopes(6)
    mask = alibi_mask(slopes, 7, 7)
    assert mask.shape == (6, 7, 7)
    for h in range(6):
        for i in range(7):
            for j in range(7):
                if j > i:
                    assert mask[h, i, j] == float("-inf")
                else:
                    assert mask[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))
    # With a KV cache, the queries are the last positions of a longer key sequence.
    torch.testing.assert_close(alibi_mask(slopes, 3, 7), mask[:, 4:])
    torch.testing.assert_close(alibi_mask(slopes, 1, 7), mask[:, 6:])


def test_alibi_keeps_the_masks_of_training_sizes_and_drops_larger_ones(monkeypatch):
    """Masks are cached per length, but a long prompt's (1, H, 8192, 8192) would stay for good: only masks of up to
    max_cached_scores are kept; a larger one is built, used and dropped."""
    alibi = ALiBi(4)
    monkeypatch.setattr(ALiBi, "max_cached_scores", 16 * 16, raising=False)
    assert alibi(16, 16) is alibi(16, 16)  # built once, kept
    larger = alibi(17, 17)
    torch.testing.assert_close(larger, alibi_mask(alibi.slopes, 17, 17)[None])
    assert larger is not alibi(17, 17)
    assert [key[:2] for key in alibi._masks] == [(16, 16)]


def test_learned_positions_refuse_sequences_longer_than_block_size():
    model = tiny("learned", block_size=8)
    with pytest.raises(ConfigError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------- sizes, tying, initialisation


def closed_form_parameter_count(V, block, L, C, learned, bias, tied):
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # qkv, proj, fc, proj (+ biases) + two LayerNorms
    ln_f = 2 * C if bias else C
    return V * C + (block * C if learned else 0) + L * per_layer + ln_f + (0 if tied else V * C)


@pytest.mark.parametrize("positions", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_closed_form(positions, bias, tied):
    model = tiny(positions, bias=bias, tie_weights=tied, n_layer=3, n_embd=24, block_size=20)
    learned = positions == "learned"
    assert model.num_parameters() == closed_form_parameter_count(37, 20, 3, 24, learned, bias, tied)
    embeddings = 37 * 24 + (20 * 24 if learned else 0)
    assert model.num_parameters(non_embedding=True) == model.num_parameters() - embeddings


@pytest.mark.parametrize("tie_weights", [True, False])
def test_flops_per_token_is_6n_plus_attention(tie_weights):
    model = tiny("alibi", tie_weights=tie_weights)  # an untied head is the same matmul: the same FLOPs
    n_matmul = 2 * (12 * 32 * 32) + 37 * 32  # layer weights + head (biases and LayerNorms counted too, below)
    n_small = 2 * (13 * 32) + 2 * 32
    assert model.flops_per_token(16) == 6 * (n_matmul + n_small) + 12 * 2 * 32 * 16


def test_tied_head_shares_storage_with_the_embedding():
    model = tiny("alibi")
    assert model.head.weight is model.wte.weight
    with torch.no_grad():
        model.wte.weight[3, 0] = 42.0
    assert model.head.weight[3, 0] == 42.0
    untied = tiny("alibi", tie_weights=False)
    assert untied.head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=128, positions="learned"))
    assert abs(model.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.001
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert abs(proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_dropout_acts_only_in_training_mode():
    model = tiny("alibi", dropout=0.5)
    idx = torch.randint(0, 37, (2, 8))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_dropout_is_inverted_dropout():
    """Training: each activation is 0 or x / (1 - p), so its expected value is x; inference: x exactly."""
    p = 0.25
    drop = tiny("alibi", dropout=p).drop
    x = torch.rand(200_000) + 0.5
    assert torch.equal(drop(x), x)  # eval mode: the identity
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert float((~kept).float().mean()) == pytest.approx(p, abs=0.005)
    assert float(y.sum() / x.sum()) == pytest.approx(1.0, abs=0.01)  # the expected activation is unchanged


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("positions", KINDS)
def test_tiny_model_overfits_one_batch(positions):
    model = tiny(positions).train()
    gen = torch.Generator().manual_seed(4)
    data = torch.randint(0, 37, (4, 17), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(120):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1


# ---------------------------------------------------------------- bad input


def test_bad_token_ids_are_refused_with_the_allowed_range():
    model = tiny("alibi")
    with pytest.raises(ConfigError, match=r"\[0, 36\]"):
        model(torch.tensor([[1, 37]]))
    with pytest.raises(ConfigError, match=r"\[0, 36\]"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ConfigError, match="idx"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="targets"):
        model(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize(
    "values, word",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_embd=15, n_head=5, positions="sinusoidal"), "even"),
        (dict(positions="rotary"), "positions"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configs_are_refused(values, word):
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(values)
    with pytest.raises(ValueError, match=word):
        GPTConfig(**base)


def test_training_after_generation_at_the_same_length():
    """Generation builds (and caches) ALiBi masks; training at that length must still be able to use them."""
    model = tiny("alibi")
    idx = torch.randint(0, 37, (1, 8), generator=torch.Generator().manual_seed(0))
    model.generate(idx, max_new_tokens=1, temperature=0)
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert model.wte.weight.grad is not None
