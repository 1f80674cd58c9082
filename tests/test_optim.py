"""The optimizer pieces against their formulas: LR schedule, gradient clipping, AdamW decay groups."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from minigpt import GPT, GPTConfig
from minigpt.optim import clip_grad_norm, lr_at, make_optimizer, param_groups


def reference_lr(step, lr, min_lr, warmup, decay):
    """Written independently: piecewise in numpy terms."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + (lr - min_lr) * (np.cos(np.pi * ratio) + 1) / 2


@pytest.mark.parametrize("warmup,decay", [(10, 100), (0, 50), (5, 6)])
def test_lr_schedule_matches_formula(warmup, decay):
    lr, min_lr = 1e-3, 1e-4
    for step in range(decay + 20):
        assert lr_at(step, lr, min_lr, warmup, decay) == pytest.approx(reference_lr(step, lr, min_lr, warmup, decay),
                                                                       rel=1e-12)


def test_lr_schedule_landmarks():
    lr, min_lr, warmup, decay = 6e-4, 6e-5, 100, 1100
    assert lr_at(0, lr, min_lr, warmup, decay) == pytest.approx(lr / warmup)
    assert lr_at(warmup - 1, lr, min_lr, warmup, decay) == pytest.approx(lr)
    assert lr_at(warmup, lr, min_lr, warmup, decay) == pytest.approx(lr)
    assert lr_at((warmup + decay) // 2, lr, min_lr, warmup, decay) == pytest.approx((lr + min_lr) / 2)
    assert lr_at(decay, lr, min_lr, warmup, decay) == pytest.approx(min_lr)
    assert lr_at(10 * decay, lr, min_lr, warmup, decay) == min_lr
    after = [lr_at(s, lr, min_lr, warmup, decay) for s in range(warmup, decay + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def _params_with_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
def test_clipping_matches_global_norm_formula(max_norm):
    params = _params_with_grads()
    before = [p.grad.clone() for p in params]
    expected_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before))
    norm = clip_grad_norm(params, max_norm)
    assert float(norm) == pytest.approx(expected_norm, rel=1e-6)  # the norm *before* clipping
    scale = min(1.0, max_norm / (expected_norm + 1e-6))
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * scale)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert after == pytest.approx(min(expected_norm, max_norm), rel=1e-5)


def test_clipping_off_reports_norm_and_leaves_gradients():
    params = _params_with_grads(1)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, 0.0)
    assert float(norm) == pytest.approx(math.sqrt(sum(float((g ** 2).sum()) for g in before)), rel=1e-6)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("tie", [True, False])
def test_decay_groups_hold_exactly_the_linear_matrices(tie):
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, positions="learned",
                          tie_weights=tie))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert {id(p) for p in decay["params"]} == linear_weights - embeddings  # a tied head is the embedding
    assert all(p.dim() >= 2 for p in decay["params"])
    every = {id(p) for p in model.parameters()}
    assert {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]} == every
    assert len(decay["params"]) + len(no_decay["params"]) == len(every)  # each parameter exactly once
    assert (id(model.head.weight) in {id(p) for p in decay["params"]}) == (not tie)


def test_adamw_decay_is_decoupled_and_only_on_matrices():
    """With zero gradients Adam's update is 0, so one step multiplies decayed weights by exactly (1 - lr*wd)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8))
    lr, wd = 0.1, 0.5
    opt = make_optimizer(model, lr, wd, (0.9, 0.95), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expected = before[name] * (1 - lr * wd) if id(p) in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    assert any(id(p) in decayed for p in model.parameters())


def reference_schedule(schedule, step, lr, min_lr, warmup, total, fraction):
    """Each schedule written out as its piecewise definition, in a different form from lr_at's."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if step >= total:
        return min_lr
    if schedule == "cosine":
        return reference_lr(step, lr, min_lr, warmup, total)
    if schedule == "linear":
        return np.interp(step, [warmup, total], [lr, min_lr])
    decay_steps = round(fraction * total)  # wsd: flat at lr, then a line down to min_lr over the last steps
    return float(np.interp(step, [max(warmup, total - decay_steps), total], [lr, min_lr]))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
@pytest.mark.parametrize("warmup,total,fraction", [(10, 100, 0.2), (0, 50, 0.5), (5, 40, 1.0), (30, 40, 0.5)])
def test_each_schedule_matches_its_formula(schedule, warmup, total, fraction):
    lr, min_lr = 1e-3, 1e-4
    for step in range(total + 10):
        got = lr_at(step, lr, min_lr, warmup, total, schedule, fraction)
        assert got == pytest.approx(reference_schedule(schedule, step, lr, min_lr, warmup, total, fraction),
                                    rel=1e-12), step


def test_schedule_landmarks():
    lr, min_lr, warmup, total = 1.0, 0.1, 10, 110
    assert lr_at(60, lr, min_lr, warmup, total, "linear") == pytest.approx(0.55)  # halfway down the line
    assert [lr_at(s, lr, min_lr, warmup, total, "constant") for s in (10, 109, 500)] == [1.0, 1.0, 1.0]
    # wsd with 20 % decay: flat to step 88, then down by (1 - 0.1) / 22 per step, min_lr from step 110 on
    wsd = [lr_at(s, lr, min_lr, warmup, total, "wsd", 0.2) for s in range(120)]
    assert wsd[10:89] == [1.0] * 79
    assert wsd[99] == pytest.approx(1.0 - 11 * 0.9 / 22) and wsd[110:] == [0.1] * 10
    assert all(a > b for a, b in zip(wsd[88:110], wsd[89:111]))
    # the default is the cosine of before
    assert lr_at(37, lr, min_lr, warmup, total) == lr_at(37, lr, min_lr, warmup, total, "cosine")


def test_wsd_extends_from_its_stable_phase():
    """nanochat's point: a wsd run to N steps passes through the same rates as a longer one until its decay."""
    short = [lr_at(s, 1.0, 0.0, 5, 100, "wsd", 0.2) for s in range(80)]
    long = [lr_at(s, 1.0, 0.0, 5, 300, "wsd", 0.2) for s in range(80)]
    assert short == long
