"""GPT-2 124M on one GPU: training tokens/s, MFU and memory of each position kind, attention kernel and compile
mode, against transformers' GPT2LMHeadModel; batch-1 greedy decoding against its `generate`.

    python bench/bench_gpu.py                          # everything, at most about 5 minutes on one H100
    python bench/bench_gpu.py --rows headline          # the rows the goals name (bench/gpu_session.sh runs this)
    python bench/bench_gpu.py --smoke                  # a tiny shape on the CPU in seconds (tests/test_bench_gpu.py)

Training rows. The 124M shape (12 layers, 12 heads, 768 wide, context 1024; GPT-2's 50,257 ids, which train.py
uses with GPT-2's tokenizer, and rows with the embedding padded to 50,304 = 786 x 64, as nanoGPT and llm.c
measure), bfloat16 autocast over float32 weights, TF32 on, at the largest power-of-two batch that fits (searched
first: two full steps of ours and of the peer at each size until one runs out of memory; the smaller of the two
is used by every row, so that all rows do the same work per step; a row that still runs out halves its batch and
says so). One step is what the trainer does: zero_grad, forward with the loss, backward, clip the gradient norm
at 1.0, fused AdamW (the preset's lr, betas and weight-decay groups, minigpt.optim.make_optimizer for both
sides). Random token ids already on the GPU: the data loader is not measured. --compile is
`torch.compile(model, dynamic=False)`, as train.py does. Each row: --warmup steps (the first includes compilation
and kernel selection, reported apart), then --steps steps, each timed between two CUDA synchronisations; tokens/s
is batch x context over the median step. MFU is the model's own FLOPs per token (GPT.flops_per_token, the same
count for the peer, whose matmuls are the same) x tokens/s over minigpt.mfu's dense bfloat16 peak for this GPU.
The peer: GPT2LMHeadModel built from a config (offline, random weights: the same compute as the real ones),
attn_implementation="sdpa", no dropout (as ours), activation gelu_pytorch_tanh (its fastest GELU; GPT-2's
"gelu_new" is a chain of element-wise ops when not compiled), labels = its inputs (it shifts them itself).

Decoding rows: batch 1, a --prompt-tokens prompt and --new-tokens greedy tokens with the KV cache, bfloat16
autocast (sample.py's default on a GPU), tokens/s over the whole call, trials interleaved, medians. Ours carries
the peer's weights (through minigpt.hf's importer), so both choose the same tokens: checked in float32 first.

Rows run one after another (a lent GPU is otherwise idle; each row's median is over its own steps), the ones the
goals name first (eager, then compiled), then decoding, then the rest. A row that would start after --budget-s
(default 255 s: about 5 minutes in all, compilation included) is listed as not run, so a budget only ever cuts
the rows that matter least. A row that fails is listed with its error and the others still run (the exit status
is then 1). Prints markdown tables; --json gets everything, rewritten after every row (a run killed by a timeout
keeps what it measured).

--smoke: the same functions on a 2-layer, 32-wide model with a 32-token context on the CPU (seconds), in
bfloat16 where the CPU's autocast has it. Two things differ, both because of the CPU: torch has no FlexAttention
backward there, so the flex training rows are listed as not run (flex still runs in the ALiBi decoding row's
prefill, inference only), and --compile uses AOTAutograd's eager backend (dynamo and AOTAutograd trace the same
forward and backward graphs; inductor's C++ code generation would take a minute on two cores).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_gpu.json"  # bench/results/ is git-ignored
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.attention import choose_attention  # noqa: E402
from minigpt.device import autocast_dtype  # noqa: E402
from minigpt.errors import ConfigError  # noqa: E402
from minigpt.mfu import choose_peak, mfu  # noqa: E402
from minigpt.optim import clip_grad_norm, make_optimizer  # noqa: E402

JSON_VERSION = 1
GPT2_VOCAB = 50257
SHAPES = {  # GPT-2 small, and the smoke test's toy (head dimension 16: FlexAttention's smallest)
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
}
# configs/gpt2-124m.toml's optimizer (the other settings of the model are GPTConfig's defaults, as there)
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
MFU_GOAL = 0.45
PEER = "transformers"


def padded(vocab_size: int, multiple: int = 64) -> int:
    """The embedding rounded up to a multiple of 64 rows (50257 -> 50304), which suits the matmul tiles."""
    return -(-vocab_size // multiple) * multiple


# ------------------------------------------------------------------------------------------------ what is run
@dataclass(frozen=True)
class TrainRow:
    """One training configuration: ours with a position kind, kernel and compile mode, or the peer."""

    side: str  # "ours" or PEER
    positions: str = "learned"
    attention: str = "sdpa"
    compiled: bool = False
    padded_vocab: bool = False

    @property
    def label(self) -> str:
        who = "ours" if self.side == "ours" else "GPT2LMHeadModel"
        vocab = ", padded vocab" if self.padded_vocab else ""
        return f"{who} {self.positions} {self.attention} {'compile' if self.compiled else 'eager'}{vocab}"

    def record(self, vocab_size: int) -> dict:
        """The row's settings as its JSON record starts: the vocabulary is GPT-2's, or padded from it."""
        return {**asdict(self), "label": self.label, "vocab_size": padded(vocab_size) if self.padded_vocab
                else vocab_size}


def plan() -> tuple[list[TrainRow], list[TrainRow]]:
    """The training rows in the order they run: first the ones the goals name (learned positions: the GPT-2
    preset; ALiBi through FlexAttention: the default model's GPU path; the peer), eager before compiled so that
    a tight --budget-s still leaves every ratio but compile's; then the rest of the matrix."""
    headline = [TrainRow(side, positions, attention, c) for c in (False, True)
                for side, positions, attention in (("ours", "learned", "sdpa"), ("ours", "alibi", "flex"),
                                                   (PEER, "learned", "sdpa"))]
    rest = [TrainRow("ours", p, a, c) for p, a in (("alibi", "sdpa"), ("rope", "sdpa"), ("learned", "flex"),
                                                    ("rope", "flex")) for c in (False, True)]
    rest += [TrainRow("ours", "learned", "sdpa", c, padded_vocab=True) for c in (False, True)]
    return headline, rest


@dataclass
class Bench:
    """The settings every row shares, and the clock that --budget-s is measured on."""

    device: torch.device
    amp_dtype: torch.dtype | None
    shape: dict
    vocab_size: int
    warmup: int
    steps: int
    compile_backend: str
    peak_flops: float | None
    budget_s: float
    batch: int = 0  # set by the search (or --batch-size)
    started: float = field(default_factory=time.perf_counter)

    @property
    def context(self) -> int:
        return self.shape["block_size"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------ the models
def build_ours(bench: Bench, positions: str, attention: str, vocab_size: int, training: bool = True,
               **settings) -> GPT:
    """Our GPT of the bench's shape, with the kernel choose_attention allows (a ConfigError says why not)."""
    config = GPTConfig(vocab_size=vocab_size, positions=positions, **bench.shape, **settings)
    kernel = choose_attention(attention, config, bench.device, training)  # before the weights are made
    torch.manual_seed(0)
    model = GPT(config).to(bench.device)
    model.attention = kernel
    return model


def build_peer(bench: Bench, vocab_size: int):
    """transformers' GPT2LMHeadModel of the same shape, from a config: nothing is downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = bench.shape
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=shape["block_size"], n_layer=shape["n_layer"],
                        n_head=shape["n_head"], n_embd=shape["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, activation_function="gelu_pytorch_tanh", attn_implementation="sdpa",
                        bos_token_id=0, eos_token_id=None, pad_token_id=None)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what it falls back to anyway, without a warning at every row
    return model.to(bench.device)


def flops_per_token(bench: Bench, vocab_size: int) -> int:
    """Training FLOPs per token of the GPT-2 shape at this vocabulary, by our model's count (the peer's matmuls are
    the same ones: fused QKV is one Conv1D there). Counted on the meta device: no memory, no time."""
    with torch.device("meta"):
        return GPT(GPTConfig(vocab_size=vocab_size, positions="learned", **bench.shape)).flops_per_token(bench.context)


# ------------------------------------------------------------------------------------------------ training
def training_step(bench: Bench, model: torch.nn.Module, side: str, compiled: bool) -> Callable[[Tensor], None]:
    """One optimizer step on a (B, T + 1) batch of token ids, as minigpt's trainer takes it: zero_grad, forward with
    the loss under autocast, backward, clip, AdamW."""
    model.train()
    optimizer = make_optimizer(model, LR, WEIGHT_DECAY, BETAS, bench.device.type)  # fused on CUDA
    runner = torch.compile(model, dynamic=False, backend=bench.compile_backend) if compiled else model
    params = list(model.parameters())

    def loss_of(batch: Tensor) -> Tensor:
        x = batch[:, :-1]
        if side == "ours":
            return runner(x, batch[:, 1:])[1]
        return runner(input_ids=x, labels=x).loss  # the peer shifts its labels itself

    def step(batch: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with bench.autocast():
            loss = loss_of(batch)
        loss.backward()
        clip_grad_norm(params, GRAD_CLIP)
        optimizer.step()

    return step


def random_batch(bench: Bench, batch: int, vocab_size: int) -> Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, bench.context + 1), generator=generator).to(bench.device)


def timed(bench: Bench, fn: Callable[[], object]) -> float:
    """Seconds of one call, between two CUDA synchronisations (the GPU's work counted, not just its queueing)."""
    bench.sync()
    start = time.perf_counter()
    fn()
    bench.sync()
    return time.perf_counter() - start


def free_memory(bench: Bench) -> None:
    """Give back what the last row held: its graphs (dynamo keeps them, and their guards, per code object) and the
    allocator's cached blocks, so that the next row's peak memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)


def largest_batch(fits: Callable[[int], None], candidates: list[int]) -> tuple[int | None, list[dict]]:
    """The largest of `candidates` (ascending) for which fits(b) runs without running out of memory, trying them in
    order up to the first that does not; and what each try gave."""
    largest, tries = None, []
    for b in candidates:
        try:
            fits(b)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        tries.append({"batch": b, "fits": ok})  # the exception (and the tensors its frames hold) is gone here
        if not ok:
            break
        largest = b
    return largest, tries


def search_batch(bench: Bench, max_batch: int) -> dict:
    """The largest power-of-two batch at which two full steps of ours (learned, sdpa, eager: the preset's model)
    and of the peer fit; every row then uses the smaller of the two."""
    candidates = [2 ** k for k in range(int(math.log2(max_batch)) + 1)]
    found = {}
    for side in ("ours", PEER):
        found[side] = _largest_batch_of(bench, side, candidates)
        free_memory(bench)
    sizes = [b for b, _ in found.values()]
    return {"candidates": candidates, "ours": found["ours"][0], PEER: found[PEER][0],
            "tries": {side: tries for side, (_, tries) in found.items()},
            "batch": min(sizes) if None not in sizes else None}


def _largest_batch_of(bench: Bench, side: str, candidates: list[int]) -> tuple[int | None, list[dict]]:
    model = build_ours(bench, "learned", "sdpa", bench.vocab_size) if side == "ours" \
        else build_peer(bench, bench.vocab_size)
    step = training_step(bench, model, side, compiled=False)

    def fits(b: int) -> None:
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()  # the last size's cached blocks, which a larger one may not be able to reuse
        batch = random_batch(bench, b, bench.vocab_size)
        for _ in range(2):  # the first step also allocates AdamW's moments
            step(batch)
        bench.sync()

    return largest_batch(fits, candidates)  # the model goes with this frame; the caller frees the memory


def measure_training(bench: Bench, row: TrainRow, flops: dict[int, int]) -> dict:
    """One row's numbers; a row that runs out of memory at the shared batch halves it until it fits."""
    result = row.record(bench.vocab_size)
    vocab_size = result["vocab_size"]
    if bench.elapsed() > bench.budget_s:
        return {**result, "status": f"not run: past --budget-s {bench.budget_s:g}"}
    try:
        model = build_ours(bench, row.positions, row.attention, vocab_size) if row.side == "ours" \
            else build_peer(bench, vocab_size)
    except ConfigError as exc:
        return {**result, "status": f"not run: {exc}"}
    batch_size, oom = bench.batch, False
    try:
        while True:
            try:
                return {**result, **run_steps(bench, model, row, batch_size, vocab_size, flops[vocab_size]),
                        "status": "ok" if not oom else f"ok at batch {batch_size}: out of memory at {bench.batch}"}
            except torch.OutOfMemoryError:
                oom = True
            model.zero_grad(set_to_none=True)  # the failed step's gradients
            free_memory(bench)
            if batch_size == 1:
                return {**result, "status": "error: out of memory at batch 1"}
            batch_size //= 2
    finally:
        del model
        free_memory(bench)


def run_steps(bench: Bench, model: torch.nn.Module, row: TrainRow, batch_size: int, vocab_size: int,
              flops: int) -> dict:
    step = training_step(bench, model, row.side, row.compiled)
    batch = random_batch(bench, batch_size, vocab_size)
    first = timed(bench, lambda: step(batch))
    for _ in range(bench.warmup - 1):
        step(batch)
    seconds = [timed(bench, lambda: step(batch)) for _ in range(bench.steps)]
    tokens = batch_size * bench.context
    rate = tokens / statistics.median(seconds)
    return {"batch": batch_size, "tokens_per_step": tokens, "step_ms": 1e3 * statistics.median(seconds),
            "tokens_per_sec": rate, "tokens_per_sec_min": tokens / max(seconds),
            "tokens_per_sec_max": tokens / min(seconds), "first_step_s": first,
            "mfu": mfu(flops, rate, bench.peak_flops) if bench.peak_flops else None,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(bench.device) / 2 ** 30
                                if bench.device.type == "cuda" else None)}


# ------------------------------------------------------------------------------------------------ decoding
def ours_decoder(bench: Bench, model: GPT, compiled: bool) -> Callable[[Tensor, int], Tensor]:
    """How our side decodes greedily at batch 1: GPT.generate, through the engine; compiled, its one-position step
    is the static-shape step of minigpt/static_step.py (on CUDA replayed as a CUDA graph). The engine compiles
    with torch.compile's default backend; another --compile-backend (--smoke's CPU one) is swapped in around it."""
    def decode(prompt: Tensor, new_tokens: int) -> Tensor:
        with _compile_backend(bench.compile_backend) if compiled else contextlib.nullcontext():
            return model.generate(prompt, new_tokens, temperature=0, compile=compiled)

    return decode


@contextlib.contextmanager
def _compile_backend(backend: str) -> Iterator[None]:
    if backend == "inductor":
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend=backend)
    try:
        yield
    finally:
        torch.compile = real


def peer_decoder(peer) -> Callable[[Tensor, int], Tensor]:
    def decode(prompt: Tensor, new_tokens: int) -> Tensor:
        return peer.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    return decode


def same_weights(bench: Bench, peer) -> GPT:
    """Ours with the peer's weights, through the importer GPT.from_pretrained uses (GELU's tanh form, as the
    peer's gelu_pytorch_tanh)."""
    from minigpt.hf import to_minigpt_names

    model = build_ours(bench, "learned", "sdpa", bench.vocab_size, training=False, activation="gelu_tanh")
    model.load_state_dict(to_minigpt_names(peer.state_dict(), "gpt2", model.config), strict=False)
    return model


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 matmuls in float32 for a while: main() turns TF32 on, as the trainer does."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measure_decoding(bench: Bench, prompt_tokens: int, new_tokens: int, trials: int) -> dict:
    """Batch-1 greedy decoding: ours (learned positions, with the peer's weights; and ALiBi through FlexAttention's
    prefill, the default model), eager and compiled, against the peer's generate."""
    rows = [{"label": "GPT2LMHeadModel.generate", "side": PEER, "positions": "learned", "compiled": False},
            {"label": "ours learned eager", "side": "ours", "positions": "learned", "compiled": False},
            {"label": "ours learned compiled", "side": "ours", "positions": "learned", "compiled": True},
            {"label": "ours alibi (flex prefill) eager", "side": "ours", "positions": "alibi", "compiled": False},
            {"label": "ours alibi (flex prefill) compiled", "side": "ours", "positions": "alibi", "compiled": True}]
    settings = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "trials": trials, "batch": 1}
    if bench.elapsed() > bench.budget_s:
        return {**settings, "rows": [{**r, "status": f"not run: past --budget-s {bench.budget_s:g}"} for r in rows]}
    peer = build_peer(bench, bench.vocab_size).eval()
    learned = same_weights(bench, peer).eval()
    alibi = build_ours(bench, "alibi", "flex", bench.vocab_size, training=False).eval()
    decoders: dict[str, Callable[[Tensor, int], Tensor]] = {rows[0]["label"]: peer_decoder(peer)}
    for row in rows[1:]:
        decoders[row["label"]] = ours_decoder(bench, learned if row["positions"] == "learned" else alibi,
                                              row["compiled"])
    prompt = torch.randint(0, bench.vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).to(bench.device)

    # Same weights, same greedy tokens: in float32 without TF32, since random weights give near-ties that
    # bfloat16's (or TF32's) rounding flips.
    check = min(new_tokens, 32)
    with exact_float32():
        ours_ids = decoders["ours learned eager"](prompt, check)[0, prompt_tokens:]
        peer_ids = decoders["GPT2LMHeadModel.generate"](prompt, check)[0, prompt_tokens:]
    agreement = (ours_ids == peer_ids).float().mean().item()

    seconds: dict[str, list[float]] = {label: [] for label in decoders}
    with bench.autocast():
        for fn in decoders.values():  # warm-up: kernel selection, FlexAttention's and the decoding step's compiles
            fn(prompt, new_tokens)
        for _ in range(trials):
            for label, fn in decoders.items():
                seconds[label].append(timed(bench, functools.partial(fn, prompt, new_tokens)))
    for row in rows:
        times = seconds[row["label"]]
        row.update(status="ok", tokens_per_sec=new_tokens / statistics.median(times),
                   tokens_per_sec_min=new_tokens / max(times), tokens_per_sec_max=new_tokens / min(times))
    del peer, learned, alibi, decoders
    free_memory(bench)
    return {**settings, "greedy_agreement_float32": agreement, "agreement_tokens": check, "rows": rows}


# ------------------------------------------------------------------------------------------------ ratios
def ratios(training: list[dict], decoding: dict, vocab_size: int) -> list[dict]:
    """The ratios the issue's goals name, each with its goal (None: reported only) and whether it is met; a ratio
    whose rows were not in the plan (--rows headline) is left out, one whose rows did not run has no value."""
    def rows(side: str, positions: str, attention: str, compiled: bool | None, padded_vocab: bool) -> list[dict]:
        return [r for r in training if r["side"] == side and r["positions"] == positions and
                r["attention"] == attention and r["padded_vocab"] == padded_vocab and
                (compiled is None or r["compiled"] == compiled)]

    def rate(side: str, positions: str = "learned", attention: str = "sdpa", compiled: bool | None = None,
             padded_vocab: bool = False) -> float | None | bool:
        """tokens/s of a row (compiled None: the faster of eager and compiled); None if it did not run, False if
        it was not planned."""
        found = rows(side, positions, attention, compiled, padded_vocab)
        rates = [r["tokens_per_sec"] for r in found if "tokens_per_sec" in r]
        return max(rates) if rates else None if found else False

    def decode_rate(label: str) -> float | None | bool:
        found = [r for r in decoding.get("rows", []) if r["label"] == label]
        return found[0].get("tokens_per_sec") if found else False

    out = []

    def add(name: str, num: float | None | bool, den: float | None | bool, goal: float | None) -> None:
        if num is False or den is False:
            return
        value = num / den if num is not None and den else None
        met = None if value is None or goal is None else value >= goal
        out.append({"ratio": name, "value": value, "goal": goal, "met": met})

    for compiled, mode in ((False, "eager"), (True, "compiled"), (None, "each at its best")):
        add(f"ours / transformers tokens/s, {mode} (learned, sdpa)", rate("ours", compiled=compiled),
            rate(PEER, compiled=compiled), 1.3)
    learned = rows("ours", "learned", "sdpa", None, False)
    top = max((r for r in learned if r.get("mfu") is not None), key=lambda r: r["mfu"], default=None)
    add(f"MFU / 45 % ({top['label'] if top else 'ours learned sdpa'})", top["mfu"] if top else None if learned
        else False, MFU_GOAL, 1.0)
    for compiled, mode in ((False, "eager"), (True, "compiled")):
        add(f"ALiBi (flex) / learned (sdpa) tokens/s, {mode}", rate("ours", "alibi", "flex", compiled),
            rate("ours", compiled=compiled), 0.9)
        add(f"ALiBi (sdpa) / learned (sdpa) tokens/s, {mode}", rate("ours", "alibi", "sdpa", compiled),
            rate("ours", compiled=compiled), None)
    kinds = (("ours", "learned", "sdpa"), ("ours", "alibi", "flex"), ("ours", "alibi", "sdpa"),
             ("ours", "rope", "sdpa"), ("ours", "learned", "flex"), ("ours", "rope", "flex"), (PEER, "learned", "sdpa"))
    for side, positions, attention in kinds:
        who = "transformers" if side == PEER else f"ours {positions} {attention}"
        add(f"compile / eager tokens/s, {who}", rate(side, positions, attention, True),
            rate(side, positions, attention, False), 1.2 if side == "ours" else None)
    add(f"padded vocab ({padded(vocab_size)}) / {vocab_size} tokens/s, learned sdpa, each at its best",
        rate("ours", padded_vocab=True), rate("ours"), None)
    add("decoding: ours eager / generate tokens/s", decode_rate("ours learned eager"),
        decode_rate("GPT2LMHeadModel.generate"), None)
    add("decoding: ours compiled / ours eager tokens/s", decode_rate("ours learned compiled"),
        decode_rate("ours learned eager"), 3.0)
    return out


# ------------------------------------------------------------------------------------------------ output
def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def training_table(rows: list[dict]) -> str:
    lines = ["| model | positions | attention | mode | vocab | batch | tokens/s (median, min-max) | step ms | MFU | "
             "peak GiB | first step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        who = "ours" if r["side"] == "ours" else "GPT2LMHeadModel"
        head = (f"| {who} | {r['positions']} | {r['attention']} | {'compile' if r['compiled'] else 'eager'} | "
                f"{r['vocab_size']} |")
        if "tokens_per_sec" not in r:
            lines.append(f"{head} {r['status']} | | | | | |")
            continue
        note = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(f"{head} {r['batch']}{note} | {r['tokens_per_sec']:,.0f} ({r['tokens_per_sec_min']:,.0f}-"
                     f"{r['tokens_per_sec_max']:,.0f}) | {r['step_ms']:.1f} | {_num(r['mfu'], '.1%')} | "
                     f"{_num(r['peak_memory_gib'], '.1f')} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def decoding_table(decoding: dict) -> str:
    reference = next((r.get("tokens_per_sec") for r in decoding["rows"] if r["side"] == PEER), None)
    lines = ["| decoder | tokens/s (median, min-max) | vs generate |", "|---|---|---|"]
    for r in decoding["rows"]:
        if "tokens_per_sec" not in r:
            lines.append(f"| {r['label']} | {r['status']} | |")
            continue
        versus = f"{r['tokens_per_sec'] / reference:.2f}x" if reference else "-"
        lines.append(f"| {r['label']} | {r['tokens_per_sec']:,.1f} ({r['tokens_per_sec_min']:,.1f}-"
                     f"{r['tokens_per_sec_max']:,.1f}) | {versus} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    lines = ["| ratio | value | goal |", "|---|---|---|"]
    for r in rows:
        goal = "-" if r["goal"] is None else f">= {r['goal']:g}x" + (
            "" if r["met"] is None else " met" if r["met"] else " **missed**")
        lines.append(f"| {r['ratio']} | {_num(r['value'], '.2f')}{'x' if r['value'] is not None else ''} | {goal} |")
    return "\n".join(lines)


def machine(bench: Bench, peak_reason: str) -> dict:
    try:
        import transformers
        peer_version = transformers.__version__
    except ImportError:
        peer_version = None
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "CPU"
    return {"device": name, "torch": torch.__version__, "transformers": peer_version,
            "python": platform.python_version(), "peak": peak_reason,
            "dtype": str(bench.amp_dtype).removeprefix("torch.") if bench.amp_dtype else "float32"}


def write_json(path: Path, report: dict) -> None:
    """Atomically: a run killed while writing leaves the previous file, not half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, in seconds (what the test runs)")
    p.add_argument("--rows", choices=("all", "headline", "rest"), default="all",
                   help="headline: the rows the goals name (learned sdpa, ALiBi flex, the peer; decoding); rest: "
                        "the other training rows")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--vocab-size", type=int, default=None, help=f"default GPT-2's {GPT2_VOCAB} (250 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="skip the search and use this batch")
    p.add_argument("--max-batch", type=int, default=None, help="the largest power of two the search tries "
                                                               "(default 512; 4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, the first included (default 3; 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; 2 with --smoke)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="decoding prompt (default 32; 4 with --smoke)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens decoded (default 256; 8)")
    p.add_argument("--decode-trials", type=int, default=None, help="interleaved decoding trials (default 3; 1)")
    p.add_argument("--compile-backend", default=None, help="torch.compile's backend (default inductor; aot_eager "
                                                           "with --smoke on a CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense TFLOP/s for MFU, if "
                                                                   "minigpt/mfu.py's table does not know it")
    p.add_argument("--budget-s", type=float, default=255.0, help="rows that would start later are not run "
                                                                 "(default 255: the whole within about 5 minutes)")
    p.add_argument("--json", default=str(RESULTS), help=f"where the results go (default {RESULTS.relative_to(ROOT)})")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(device="cpu" if smoke else "cuda", vocab_size=250 if smoke else GPT2_VOCAB,
                    max_batch=4 if smoke else 512, warmup=1 if smoke else 3, steps=2 if smoke else 10,
                    prompt_tokens=4 if smoke else 32, new_tokens=8 if smoke else 256,
                    decode_trials=1 if smoke else 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.device == "cpu" else "inductor"
    for name in ("vocab_size", "max_batch", "warmup", "steps", "prompt_tokens", "new_tokens", "decode_trials"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    context = SHAPES["smoke" if smoke else "gpt2-124m"]["block_size"]
    if args.prompt_tokens + args.new_tokens > context:
        p.error(f"--prompt-tokens + --new-tokens must fit the context of {context} (the peer's position table), "
                f"got {args.prompt_tokens} + {args.new_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU here (torch {torch.__version__}); --smoke runs the CPU check", file=sys.stderr)
        return 2
    amp_dtype = _bfloat16(device)
    if device.type == "cuda":
        if amp_dtype is None:
            print(f"bench_gpu: {torch.cuda.get_device_name(device)} has no bfloat16, which this bench measures",
                  file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer does
        torch.backends.cudnn.allow_tf32 = True
    peak = choose_peak(device, amp_dtype, args.peak_tflops)
    bench = Bench(device=device, amp_dtype=amp_dtype, shape=SHAPES["smoke" if args.smoke else "gpt2-124m"],
                  vocab_size=args.vocab_size, warmup=args.warmup, steps=args.steps,
                  compile_backend=args.compile_backend, peak_flops=peak.flops, budget_s=args.budget_s)
    report: dict = {"version": JSON_VERSION,
                    "command": " ".join(["python bench/bench_gpu.py"] + (sys.argv[1:] if argv is None else argv)),
                    "machine": machine(bench, peak.reason),
                    "settings": {"shape": bench.shape, "vocab_size": bench.vocab_size, "warmup": bench.warmup,
                                 "steps": bench.steps, "compile_backend": bench.compile_backend,
                                 "rows": args.rows, "budget_s": bench.budget_s},
                    "training": [], "decoding": {"rows": []}}
    print(f"{report['machine']['device']}, torch {torch.__version__}, transformers "
          f"{report['machine']['transformers']}, {report['machine']['dtype']} autocast\n{peak.reason}", flush=True)

    def save() -> None:
        """After every row: a run cut short (a timeout on a lent GPU) keeps what it measured."""
        report.update(ratios=ratios(report["training"], report["decoding"], bench.vocab_size),
                      elapsed_s=bench.elapsed())
        write_json(Path(args.json), report)

    if args.batch_size:
        bench.batch, report["batch_search"] = args.batch_size, {"batch": args.batch_size, "given": True}
    else:
        search = report["batch_search"] = search_batch(bench, args.max_batch)
        print(f"[{bench.elapsed():5.0f} s] largest power-of-two batch at context {bench.context}: ours "
              f"{search['ours']}, GPT2LMHeadModel {search[PEER]} (tried up to {args.max_batch}); every row uses "
              f"{search['batch']}", flush=True)
        save()
        if search["batch"] is None:
            print("bench_gpu: not even batch 1 fits in memory", file=sys.stderr)
            return 1
        bench.batch = search["batch"]

    flops = {v: flops_per_token(bench, v) for v in (bench.vocab_size, padded(bench.vocab_size))}
    headline, rest = plan()

    def train_rows(rows: list[TrainRow]) -> None:
        for row in rows:
            report["training"].append(_guarded(functools.partial(measure_training, bench, row, flops),
                                               row.record(bench.vocab_size)))
            _progress(bench, report["training"][-1])
            save()

    if args.rows in ("all", "headline"):
        train_rows(headline)
        report["decoding"] = _guarded(functools.partial(measure_decoding, bench, args.prompt_tokens,
                                                        args.new_tokens, args.decode_trials), {"rows": []})
        print(f"[{bench.elapsed():5.0f} s] decoding: {report['decoding'].get('status', 'done')}", flush=True)
        save()
    if args.rows in ("all", "rest"):
        train_rows(rest)

    training, decoding = report["training"], report["decoding"]
    print(f"\n{report['machine']['device']}: GPT-2 shape {bench.shape}, {report['machine']['dtype']} autocast, "
          f"batch {bench.batch} x {bench.context}, median of {bench.steps} steps after {bench.warmup} warm-up\n\n"
          f"{training_table(training)}\n")
    if decoding["rows"]:
        print(f"Batch-1 greedy decoding, {args.prompt_tokens}-token prompt + {args.new_tokens} tokens, KV cache, "
              f"median of {args.decode_trials} trials; same weights, same greedy tokens in float32: "
              f"{_num(decoding.get('greedy_agreement_float32'), '.0%')}\n\n{decoding_table(decoding)}\n")
    print(f"{ratio_table(report['ratios'])}\n\n{bench.elapsed():.0f} s in all; JSON: {args.json}")
    failed = [r for r in training + decoding["rows"] if r.get("status", "").startswith("error")]
    return 1 if failed or "status" in decoding else 0


def _bfloat16(device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where the device has it (on a CPU: where torch's autocast runs it), else None."""
    try:
        return autocast_dtype("bfloat16", device)
    except ConfigError:
        return None


def _guarded(measure: Callable[[], dict], row: dict) -> dict:
    """The row's numbers, or its error (printed in full to stderr) so that the other rows still run."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - a lent GPU's minutes must not be lost to one failing row
        traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {**row, "status": f"error: {type(exc).__name__}: {message}"[:300]}


def _progress(bench: Bench, row: dict) -> None:
    if "tokens_per_sec" in row:
        detail = (f"{row['tokens_per_sec']:,.0f} tokens/s, MFU {_num(row['mfu'], '.1%')}, batch {row['batch']}, "
                  f"first step {row['first_step_s']:.1f} s")
    else:
        detail = row["status"]
    print(f"[{bench.elapsed():5.0f} s] {row['label']}: {detail}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
