"""Shared by the tests: a tiny model, a tiny synthetic corpus, a tiny TrainConfig."""
import json
import os
import random
import signal
from pathlib import Path

import torch

from data.loader import BatchLoader
from minigpt import GPT
from minigpt.config import GPTConfig, TrainConfig

KINDS = ("learned", "sinusoidal", "alibi")

WORDS = ("the a one every small large red blue cat dog bird fish sees eats likes finds near under over with "
         "and but then quickly slowly today").split()


def write_corpus(path: Path, sentences: int = 1500, seed: int = 0) -> Path:
    """~50 KB of simple sentences: enough structure that a tiny model's loss visibly drops in a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS[:6]), rng.choice(WORDS[6:12]), rng.choice(WORDS[12:16]),
                 rng.choice(WORDS[:6]), rng.choice(WORDS[6:12])]
        lines.append(" ".join(words) + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(corpus: Path, cache: Path, out: Path, model: dict | None = None, **overrides) -> TrainConfig:
    """Runs on the CPU, or where MINIGPT_TEST_DEVICE says (bench/cuda_check.sh runs the training tests on a GPU)."""
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)
    values = dict(data=str(corpus), data_dir=str(cache), out_dir=str(out), vocab_size=300, batch_size=8,
                  max_iters=20, lr=3e-3, min_lr=3e-4, warmup_iters=3, eval_interval=10, eval_iters=4,
                  log_interval=1, progress=False,
                  device=os.environ.get("MINIGPT_TEST_DEVICE", "cpu"))
    values.update(overrides)
    return TrainConfig(model=GPTConfig(**{**shape, **(model or {})}), **values)


def tiny(positions: str, **overrides) -> GPT:
    """A 2-layer, 32-wide model in eval mode, seeded: small enough for reference computations in tests."""
    torch.manual_seed(0)
    values = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, positions=positions)
    values.update(overrides)
    return GPT(GPTConfig(**values)).eval()


def records(out: Path, kind: str) -> list[dict]:
    """The metrics.jsonl records of one kind ("train", "eval", ...) of the run in `out`."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def untimed(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]


def interrupt_at(monkeypatch, batches: int) -> None:
    """Deliver a real SIGINT while the loader hands out batch number `batches` (as Ctrl-C would)."""
    real = BatchLoader.next_batch

    def next_batch(self):
        if self.batches == batches:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)


def gpt2_style_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained by `tokenizers` set up as GPT-2's was (no prefix space, <|endoftext|>, all 256
    bytes): the reference tokenizer of the Hugging Face tests (save it with .save() / .model.save())."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


def overflow_at(monkeypatch, calls: int) -> None:
    """Make the gradient of the `calls`-th training forward infinite, as a float16 overflow would."""
    real, count = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = real(self, idx, targets, **kwargs)
        if targets is not None and self.training:
            count["n"] += 1
            if count["n"] == calls:
                loss.register_hook(lambda grad: grad * float("inf"))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def run_engine(engine, *seqs, join_after: dict | None = None) -> None:
    """Step an engine until every sequence is finished; join_after {step: [seqs]} adds some later."""
    for seq in seqs:
        engine.add(seq)
    step = 0
    while engine.has_work or (join_after and any(k >= step for k in join_after)):
        for seq in (join_after or {}).get(step, []):
            engine.add(seq)
        engine.step()
        assert len(engine.running) <= engine.max_batch
        step += 1
