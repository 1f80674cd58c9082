"""One decoding path for one prompt or many: an engine that runs one step for every sequence at once.

Decoding one token reads every weight of the model once; on a CPU (and on a GPU at small batches) that read, not
the arithmetic, sets the speed. Sequences decoded together share the read, so sixteen of them cost little more
than one. The engine holds up to `max_batch` sequences in the rows of one KV cache, each with its own length,
sampling settings, random generator and stop id, and lets them come and go between steps:

    add ─► waiting ─► prefilled into a free row (a forward over its prompt) ─► running: one position a step ─►
           finished ("length", "stop": its stop id, or "cancelled"): its row is freed for the next one waiting

Each `step`
  1. drops the sequences cancelled since the last one (a client that left);
  2. runs one forward of one position for every running sequence, each row at its own position;
  3. prefills the sequences that join now, and re-primes the rows that need it: a learned-position model whose
     window is full reads its last block_size tokens afresh (every cached key moves to a new position), and
     without a cache every row reads its whole text each step;
  4. chooses every sequence's next token with its own settings: rows with the same settings and generator are
     drawn in one call of `generate.choose_next`, in the order they arrived, so a batch that shares one generator
     draws exactly as one call over the batch did, and a sequence with its own generator draws the same tokens
     whatever else runs beside it.

`generate.generate_tokens` (and so `GPT.generate` and sample.py) is a client of this engine: its rows join at the
first step with equal lengths, so they take the KV cache's equal-length fast path; the server is another.

With `compile=True` the decoding forward of step 2 is a compiled step of fixed shapes instead (static_step.py),
which a GPU replays as a CUDA graph; the prefills of step 3 stay as they are.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError
from .generate import check_sampling_args, choose_next, decoding_attention
from .kv_cache import KVCache
from .model import GPT
from .static_step import MIN_CAPACITY, StaticStep

# Prompts prefilled together are padded to the longest; a group takes the next (longer) prompt only while
# padding stays under this share of its work.
PREFILL_PADDING = 0.25


@dataclass
class Sampling:
    """How a sequence chooses its tokens: the arguments of generate.choose_next. generator None draws from
    torch's global generator."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = field(default=None, compare=False)

    def group(self) -> tuple:
        """Sequences whose groups are equal are drawn in one call (greedy ones need no generator at all)."""
        if self.temperature == 0 or self.top_k == 1:
            return ("greedy",)
        return self.temperature, self.top_k, self.top_p, id(self.generator) if self.generator is not None else None

    def choose(self, logits: Tensor) -> Tensor:
        """One token per row of `logits` (rows, vocab), drawn under these settings."""
        return choose_next(logits, self.temperature, self.top_k, self.top_p, self.generator)


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (before temperature, top-k and top-p), and the `top` most likely
    tokens there as (id, log-probability) pairs, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    """A prompt and the tokens the engine adds to it. Read `tokens` (chosen so far, the stop id included when it
    came), `logprobs` (one TokenLogprob per token, when asked for) and `finish_reason` (None while running).

    - logprobs: None for none; N (0..) for each chosen token's log-probability and the N most likely tokens.
    - prompt_logprobs: also score the prompt's tokens when it is prefilled (`prompt_logprobs`, None for the
      first token, which nothing predicts).
    """

    _arrivals = itertools.count()

    def __init__(self, prompt: Iterable[int], max_new_tokens: int, sampling: Sampling | None = None,
                 stop_id: int | None = None, logprobs: int | None = None, prompt_logprobs: bool = False) -> None:
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.stop_id = stop_id
        self.top_logprobs = logprobs
        self.want_prompt_logprobs = prompt_logprobs
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self.arrival = next(Sequence._arrivals)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Decodes the sequences given to `add`, all running ones together, one token each per `step`.

    One thread drives it (`add`, `step`); `cancel` may come from another, it only sets a flag read at the next
    step. vocab_limit: ids at or above it are never chosen (an embedding padded beyond the tokenizer's ids).
    use_cache=False recomputes every sequence's whole text each step (for comparison). compile=True decodes with
    a compiled step of fixed shapes (static_step.py): CUDA graphs on a GPU; the first step of each cache size
    waits for its compilation.
    """

    def __init__(self, model: GPT, max_batch: int = 16, vocab_limit: int | None = None,
                 use_cache: bool = True, compile: bool = False) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if compile and not use_cache:
            raise ConfigError("compile=True compiles the step that decodes from the KV cache; it cannot go with "
                              "use_cache=False")
        vocab = model.config.vocab_size
        if vocab_limit is not None and (not isinstance(vocab_limit, int) or not 1 <= vocab_limit <= vocab):
            raise ConfigError(f"vocab_limit must be in [1, {vocab}] (or None), got {vocab_limit!r}")
        self.model = model
        self.max_batch = max_batch
        self.vocab_limit = vocab_limit
        self.use_cache = use_cache
        # Learned positions know block_size positions only: longer texts slide a window of that many tokens.
        self.window = model.config.context_limit
        self.device = model.wte.weight.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # with a cache, running[i] owns row i of it
        self.cache: KVCache | None = None
        self.static_step = StaticStep(model) if compile else None

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it joins the batch at the next step with a free row. Its settings are checked here."""
        s = self.model.config
        check_sampling_args(s.vocab_size, seq.max_new_tokens, seq.sampling.temperature, seq.sampling.top_k,
                            seq.sampling.top_p, seq.stop_id)
        if not seq.prompt:
            raise ConfigError("a sequence needs a prompt of at least one token (e.g. the end-of-text id)")
        if min(seq.prompt) < 0 or max(seq.prompt) >= s.vocab_size:
            raise ConfigError(f"token ids must be in [0, {s.vocab_size - 1}] (vocab_size={s.vocab_size}); got ids "
                              f"from {min(seq.prompt)} to {max(seq.prompt)}")
        if seq.top_logprobs is not None and (not isinstance(seq.top_logprobs, int) or seq.top_logprobs < 0):
            raise ConfigError(f"logprobs must be an integer >= 0 (or None), got {seq.top_logprobs!r}")
        if seq.max_new_tokens == 0 and not seq.want_prompt_logprobs:
            seq.finish_reason = "length"
        else:
            self.waiting.append(seq)
        return seq

    @staticmethod
    def cancel(seq: Sequence) -> None:
        """Ask for `seq` to stop; the engine frees its row at the next step (safe to call from any thread)."""
        seq.cancelled = True

    def clear(self) -> list[Sequence]:
        """Drop every sequence, running or waiting, and the cache (after a failed step, whose state is unknown);
        returns them. Their finish_reason is left for the caller to set."""
        dropped = self.running + list(self.waiting)
        self.running, self.waiting, self.cache = [], deque(), None
        return dropped

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[Sequence]:
        """One token for every running sequence and for those that join now; returns the sequences that changed
        (a new token, or finished)."""
        with torch.inference_mode(), decoding_attention():
            changed = self._drop_cancelled()
            reread = self._take_rows_to_reread()
            decoded = list(self.running)
            logits = [self._decode()] if decoded else []
            joining = self._admit(len(decoded) + len(reread))
            prefilled, prefill_logits = self._prefill(reread + joining)
            if prefilled:
                logits.append(prefill_logits)
            seqs = decoded + prefilled
            if not seqs:
                return changed
            logits = torch.cat(logits) if len(logits) > 1 else logits[0]
            if self.vocab_limit is not None:
                logits = logits[:, :self.vocab_limit]
            next_ids = self._choose(seqs, logits)
            self._score(seqs, logits, next_ids)
            for seq, token in zip(seqs, next_ids.tolist()):
                if seq.max_new_tokens == 0:  # only its prompt was to be scored
                    seq.finish_reason = "length"
                    continue
                seq.tokens.append(token)
                if seq.stop_id is not None and token == seq.stop_id:
                    seq.finish_reason = "stop"
                elif len(seq.tokens) >= seq.max_new_tokens:
                    seq.finish_reason = "length"
            if not self.use_cache:
                self.running = seqs  # with a cache, _prefill has already appended its rows after the decoded ones
            for row in reversed([i for i, seq in enumerate(self.running) if seq.finished]):
                self._remove_row(row)
        return changed + seqs

    # ------------------------------------------------------------------------------------------ the rows
    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [s for s in self.waiting if s.cancelled]
        if dropped:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for row in reversed([i for i, seq in enumerate(self.running) if seq.cancelled]):
            dropped.append(self.running[row])
            self._remove_row(row)
        for seq in dropped:
            seq.finish_reason = "cancelled"
        return dropped

    def _remove_row(self, row: int) -> None:
        """Free a row: the last one moves into it, in the cache as in `running`."""
        if self.cache is not None:
            self.cache.remove_row(row)
        self.running[row] = self.running[-1]
        self.running.pop()

    def _take_rows_to_reread(self) -> list[Sequence]:
        """Running sequences that must read their text afresh this step (see the module's docstring), taken out
        of their rows; the others keep theirs."""
        if not self.use_cache:
            taken, self.running = self.running, []
            return taken
        if self.window is None or not self.running:
            return []
        full = [row for row, length in enumerate(self.cache.lengths) if length >= self.window]
        taken = [self.running[row] for row in full]
        for row in reversed(full):
            self._remove_row(row)
        return taken

    def _admit(self, busy: int) -> list[Sequence]:
        """Waiting sequences that fit in the free rows, oldest first, with the cache made big enough for their
        prompts (it grows as their texts do, in _decode: a request's max_tokens reserves nothing)."""
        joining = [self.waiting.popleft() for _ in range(min(self.max_batch - busy, len(self.waiting)))]
        if joining and self.use_cache:
            self._make_room(max(len(self._context(s)) for s in joining))
        return joining

    def _make_room(self, positions: int) -> None:
        """A cache of at least `positions` positions in every row, grown by doubling (a server's growing texts copy
        it rarely); compiled, in powers of two (each capacity is a graph to compile); never beyond the window."""
        if self.static_step is not None:
            positions = max(MIN_CAPACITY, 1 << (positions - 1).bit_length())
        if self.window is not None:
            positions = min(positions, self.window)
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_batch, positions)
            self.cache.reset(rows=0)
        elif positions > self.cache.capacity:
            doubled = 2 * self.cache.capacity if self.window is None else min(2 * self.cache.capacity, self.window)
            self.cache.reserve(max(positions, doubled))

    # ------------------------------------------------------------------------------------------ forwards
    def _decode(self) -> Tensor:
        """Logits (rows, vocab) after feeding every running row its last token, each at its own position."""
        tokens = [seq.tokens[-1] for seq in self.running]
        self._make_room(max(self.cache.lengths) + 1)
        if self.static_step is not None:
            return self.static_step(self.cache, tokens)
        hidden = self.model.hidden_states(torch.tensor(tokens, device=self.device)[:, None], self.cache)
        return self.model.head(hidden[:, -1])

    def _context(self, seq: Sequence) -> list[int]:
        text = seq.prompt + seq.tokens
        return text[-self.window:] if self.window is not None else text

    def _prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], Tensor | None]:
        """Forward passes over the whole (windowed) text of `seqs`, in groups of similar lengths padded to the
        longest; with a cache, each becomes a running row. Returns the sequences in the order of the logits."""
        if not seqs:
            return [], None
        seqs = sorted(seqs, key=lambda s: len(self._context(s)))
        ordered, logits = [], []
        for group in _length_groups(seqs, [len(self._context(s)) for s in seqs]):
            logits.append(self._prefill_group(group))
            ordered += group
        return ordered, torch.cat(logits) if len(logits) > 1 else logits[0]

    def _prefill_group(self, seqs: list[Sequence]) -> Tensor:
        contexts = [self._context(s) for s in seqs]
        lengths = [len(c) for c in contexts]
        longest = max(lengths)
        # Padding goes after each text: causal attention keeps it out of sight of the real positions.
        idx = torch.tensor([c + [0] * (longest - len(c)) for c in contexts], device=self.device)
        cache = self.model.new_cache(len(seqs), longest) if self.use_cache else None
        hidden = self.model.hidden_states(idx, cache)
        last = torch.tensor(lengths, device=self.device) - 1
        for i, seq in enumerate(seqs):
            if seq.want_prompt_logprobs and seq.prompt_logprobs is None:
                seq.prompt_logprobs = self._prompt_logprobs(seq, contexts[i], hidden[i, :lengths[i]])
            if cache is not None:
                self.cache.set_row(len(self.running), cache, i, lengths[i])
                self.running.append(seq)
        return self.model.head(hidden[torch.arange(len(seqs), device=self.device), last])

    def _prompt_logprobs(self, seq: Sequence, context: list[int], hidden: Tensor) -> list[TokenLogprob | None]:
        """Each prompt token scored by the positions before it (a prompt cut to the window: its tokens before
        the window are not scored)."""
        logprobs = self._log_softmax(self.model.head(hidden[:-1]))
        targets = torch.tensor(context[1:], device=self.device)
        scored = _logprob_records(logprobs, targets, seq.top_logprobs or 0)
        return [None] * (len(seq.prompt) - len(scored)) + scored

    # ------------------------------------------------------------------------------------------ choosing
    def _choose(self, seqs: list[Sequence], logits: Tensor) -> Tensor:
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(seqs):
            groups.setdefault(seq.sampling.group(), []).append(row)
        if len(groups) == 1:  # every row alike (one prompt, or a batch of generate): one call, no gather
            rows = sorted(range(len(seqs)), key=lambda r: seqs[r].arrival)
            if rows == list(range(len(seqs))):
                return seqs[0].sampling.choose(logits)
        next_ids = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            rows.sort(key=lambda r: seqs[r].arrival)
            index = torch.tensor(rows, device=logits.device)
            next_ids[index] = seqs[rows[0]].sampling.choose(logits[index])
        return next_ids

    def _score(self, seqs: list[Sequence], logits: Tensor, next_ids: Tensor) -> None:
        """Log-probabilities of the chosen tokens, for the sequences that asked."""
        rows = [r for r, seq in enumerate(seqs) if seq.top_logprobs is not None and seq.max_new_tokens > 0]
        if not rows:
            return
        index = torch.tensor(rows, device=logits.device)
        top = max(seqs[r].top_logprobs for r in rows)
        records = _logprob_records(self._log_softmax(logits[index]), next_ids[index], top)
        for r, record in zip(rows, records):
            seqs[r].logprobs.append(TokenLogprob(record.logprob, record.top[:seqs[r].top_logprobs]))

    def _log_softmax(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits[..., :self.vocab_limit].float(), dim=-1)


def _logprob_records(logprobs: Tensor, targets: Tensor, top: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of `logprobs` (rows, vocab) for the token `targets[row]`."""
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _length_groups(seqs: list[Sequence], lengths: list[int]) -> list[list[Sequence]]:
    """Split sequences sorted by length into runs whose padding to the run's longest stays under PREFILL_PADDING."""
    groups: list[list[Sequence]] = []
    total = 0
    for seq, length in zip(seqs, lengths):
        if groups and (len(groups[-1]) + 1) * length <= (1 + PREFILL_PADDING) * (total + length):
            groups[-1].append(seq)
            total += length
        else:
            groups.append([seq])
            total = length
    return groups
