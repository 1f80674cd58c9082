"""--optimizer muon: which parameters it takes, its step against a direct orthogonalisation and against its
documented rule, its own learning rate on the schedule, and checkpoints that resume exactly."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from minigpt import GPT, GPTConfig
from minigpt.checkpoint import load_model, load_train_state, save_checkpoint
from minigpt.errors import CheckpointError, ConfigError
from minigpt.evaluate import evaluate_loss
from minigpt.optim import MuonAdamW, make_optimizer, set_lr
from minigpt.trainer import train
from tokenizer import Tokenizer

from helpers import tiny_config, write_corpus

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, torch.optim.Muon's documented default


def model_with_grads(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    values = dict(vocab_size=260, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_weights=False)
    model = GPT(GPTConfig(**{**values, **overrides}))
    set_grads(model, seed)
    return model


def set_grads(model: GPT, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 100)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def hidden_matrices(model: GPT) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2}


def newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """torch.optim.Muon's documented orthogonalisation, in float64: X ← aX + (b·XXᵀ + c·(XXᵀ)²)X from X = G/‖G‖_F
    (worked on the wide orientation)."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_muon_takes_exactly_the_blocks_matrices_and_adamw_the_rest():
    model = model_with_grads()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu", "muon", 0.02)
    assert isinstance(opt, MuonAdamW)
    adamw, muon = opt.optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    linear_in_blocks = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    assert muon_ids == linear_in_blocks == {id(p) for p in hidden_matrices(model).values()}
    adamw_ids = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert id(model.head.weight) in adamw_ids and id(model.wte.weight) in adamw_ids  # untied head, embedding
    assert sorted(adamw_ids + list(muon_ids)) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]  # decayed, undecayed, Muon's


def test_one_step_orthogonalises_the_gradient_at_the_muon_rate_and_adamw_moves_the_rest():
    """First step (zero momentum): Muon's update of W (A×B) is -muon_lr·sqrt(max(1, A/B))·O with O ≈ U Vᵀ of the
    gradient G = U S Vᵀ; Newton-Schulz is deliberately approximate (singular values land in about [0.7, 1.2],
    in bfloat16), so O is compared with U Vᵀ in its singular basis, and exactly with the documented rule.
    AdamW's first step is -lr·g/(|g| + eps) (bias-corrected moments), at its own rate. Both follow the schedule."""
    lr, muon_lr, wd, scheduled = 1e-3, 0.05, 0.1, 0.5
    model = model_with_grads()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = make_optimizer(model, lr, wd, (0.9, 0.99), "cpu", "muon", muon_lr)
    set_lr(opt, scheduled * lr)  # the schedule at half the peak: both rates are halved
    opt.step()
    gamma = scheduled * muon_lr
    for name, p in hidden_matrices(model).items():
        rows, cols = p.shape
        update = (before[name] * (1 - gamma * wd) - p.detach()) / (gamma * math.sqrt(max(1, rows / cols)))
        U, _, Vh = torch.linalg.svd(p.grad.double(), full_matrices=False)
        in_basis = U.T @ update.double() @ Vh.T  # diagonal for an orthogonalisation of G
        off_diagonal = in_basis - torch.diag(in_basis.diagonal())
        assert off_diagonal.abs().max() < 0.03, name
        assert 0.6 < in_basis.diagonal().min() and in_basis.diagonal().max() < 1.25, name
        torch.testing.assert_close(update.double(), newton_schulz_float64(p.grad), atol=0.02, rtol=0.05)
    for name, p in model.named_parameters():
        if name not in hidden_matrices(model):
            decay = wd if p.dim() == 2 and name != "wte.weight" else 0.0  # the untied head decays, embeddings not
            adam_step = p.grad / (p.grad.abs() + 1e-8)  # m̂ / (sqrt(v̂) + eps) after one step
            expected = before[name] * (1 - scheduled * lr * decay) - scheduled * lr * adam_step
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0, msg=name)


def test_second_step_follows_nesterov_momentum():
    """torch.optim.Muon's documented rule: B ← μB + g, update NS(g + μB) (Nesterov), μ = 0.95."""
    muon_lr, mu = 0.05, 0.95
    model = model_with_grads()
    opt = make_optimizer(model, 1e-3, 0.0, (0.9, 0.99), "cpu", "muon", muon_lr)
    matrices = hidden_matrices(model)
    momentum = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in matrices.items()}
    for seed in (0, 1):
        set_grads(model, seed)
        before = {name: p.detach().clone() for name, p in matrices.items()}
        opt.step()
        for name, p in matrices.items():
            momentum[name] = mu * momentum[name] + p.grad.double()
            expected = newton_schulz_float64(p.grad.double() + mu * momentum[name])
            rows, cols = p.shape
            update = (before[name] - p.detach()) / (muon_lr * math.sqrt(max(1, rows / cols)))
            torch.testing.assert_close(update.double(), expected, atol=0.02, rtol=0.05)


def test_state_round_trips_through_a_checkpoint_and_continues_identically(tmp_path):
    model = model_with_grads()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu", "muon", 0.02)
    opt.step()
    tok = Tokenizer.train(["some text to learn a few merges from"] * 4, vocab_size=260, progress=False)
    save_checkpoint(tmp_path, model, tok, {"model": model.config.to_dict()}, opt, {"step": 1})
    assert sum(k.endswith("momentum_buffer") for k in load_file(str(tmp_path / "train_state.safetensors"))) == 8
    assert sum(k.endswith("exp_avg_sq") for k in load_file(str(tmp_path / "train_state.safetensors"))) == \
        sum(1 for name, _ in model.named_parameters() if name not in hidden_matrices(model))

    restored = GPT(model.config)
    restored_opt = make_optimizer(restored, 1e-3, 0.1, (0.9, 0.99), "cpu", "muon", 0.02)
    load_train_state(tmp_path, restored, restored_opt)
    assert json.dumps(restored_opt.state_dict()["param_groups"]) == json.dumps(
        json.loads(json.dumps(opt.state_dict()["param_groups"])))
    for m, o in ((model, opt), (restored, restored_opt)):
        set_grads(m, seed=7)
        o.step()
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- through the training loop

SWITCHED = dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder / "corpus.txt"), folder / "cache"


def train_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_muon_run_resumes_exactly_and_its_checkpoint_serves_sampling_and_eval(tmp_path, corpus):
    """N steps with the schedule of 2N, then resume to 2N: the same losses and weights as 2N at once."""
    common = dict(optimizer="muon", muon_lr=0.02, eval_interval=8, lr_decay_iters=16)
    straight = train(tiny_config(*corpus, tmp_path / "a", SWITCHED, max_iters=16, **common))
    train(tiny_config(*corpus, tmp_path / "b", SWITCHED, max_iters=8, **common))
    resumed = train(tiny_config(*corpus, tmp_path / "b", SWITCHED, max_iters=16, resume=True, **common))
    assert train_losses(straight) == train_losses(resumed)
    assert train_losses(straight)[-1] < train_losses(straight)[0]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, tok, config = load_model(resumed)  # what sample.py and its --eval build
    assert {k: config["model"][k] for k in SWITCHED} == SWITCHED and config["train"]["optimizer"] == "muon"
    idx = torch.tensor([tok.encode("the cat")])
    assert torch.equal(model.generate(idx, 20, temperature=0), model.generate(idx, 20, temperature=0, use_cache=False))
    last_eval = [r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "eval"][-1]
    (meta,) = corpus[1].glob("*/meta.json")
    val = np.fromfile(meta.parent / "val.bin", dtype=np.dtype(json.loads(meta.read_text())["dtype"]))
    again = evaluate_loss(model, val, 16, 8, 4, tok.token_byte_lengths())
    assert again["loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)


def test_resume_with_another_optimizer_is_refused(tmp_path, corpus):
    out = train(tiny_config(*corpus, tmp_path / "run", max_iters=2, eval_interval=2))
    with pytest.raises(CheckpointError, match="trained with --optimizer adamw; resume with it"):
        train(tiny_config(*corpus, out, max_iters=4, optimizer="muon", resume=True))


def test_a_torch_without_muon_is_a_one_line_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"--optimizer muon needs torch.optim.Muon \(torch >= 2.9\)"):
        make_optimizer(model_with_grads(), 1e-3, 0.1, (0.9, 0.99), "cpu", "muon", 0.02)
