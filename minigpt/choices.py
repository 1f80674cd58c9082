"""Multiple-choice evaluation (HellaSwag and the like): which ending does the model find most likely?

Each item is a context and a few choices, one of them right (`label`). As build-nanogpt and llm.c score
HellaSwag, and so as to give their numbers for the same model (GPT-2 124M: acc 0.2859, acc_norm 0.2955):

- a choice's row is the context's tokens followed by the tokens of `" " + choice`, each string encoded on its
  own (so a choice never merges with the end of the context);
- the model reads the row once, and the choice's score is the log-likelihood of its own tokens only, each
  predicted from everything before it;
- `acc` counts the items whose highest summed log-likelihood is the right choice; `acc_norm` the items whose
  highest mean per token is (long endings are not penalised for having more tokens to pay for). A tie goes to
  the first choice.

A row longer than the model's context keeps its last tokens: the context is cut from the left, and the item is
counted in `cut` (and in `choices_cut` when a choice alone is that long: only its last tokens are scored). An
empty context becomes the end-of-text token (the start of every document in training); with a tokenizer that has
none, an item with an empty context is refused.

Rows of all items are scored in batches of similar length: sorted by length, padded on the right. Padding after
a row's end cannot change what the row's own positions see (attention is causal), so a batch gives each row
the logits it would get alone.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenizer import Tokenizer

from .errors import MinigptError


@dataclass(frozen=True)
class Item:
    """One question: the choices continue the context, and choices[label] is the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    where: str | None = field(default=None, compare=False)  # "FILE line N", for errors found once it is encoded


def read_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all: None) of a .jsonl file, one JSON object a line: HellaSwag's own form
    (`ctx`, `endings`, `label`) or `{"context": ..., "choices": [...], "label": k}`. Blank lines are skipped; any
    other line that is not a valid item is a MinigptError naming the file and the line number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MinigptError(f"cannot read the multiple-choice file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MinigptError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); give a .jsonl file of "
                           f"multiple-choice items") from None
    items = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(items) >= limit:
            break
        if line.strip():
            items.append(_parse_item(line, f"{path} line {number}"))
    if not items:
        raise MinigptError(f"{path} holds no items; give a .jsonl file with one JSON object a line (ctx, endings, "
                           f"label as in HellaSwag, or context, choices, label)")
    return items


def _parse_item(line: str, where: str) -> Item:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise MinigptError(f"{where} is not JSON ({exc}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise MinigptError(f"{where} is not a JSON object; each line must be one object with ctx, endings, label "
                           f"(HellaSwag) or context, choices, label")
    if "ctx" in row and "endings" in row:
        context, choices = row["ctx"], row["endings"]
    elif "context" in row and "choices" in row:
        context, choices = row["context"], row["choices"]
    else:
        raise MinigptError(f"{where} has neither ctx + endings (HellaSwag) nor context + choices; its keys are "
                           f"{', '.join(sorted(row)) or 'none'}")
    if not isinstance(context, str):
        raise MinigptError(f"{where}: the context must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise MinigptError(f"{where}: the choices must be a list of at least 2 strings")
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # Hugging Face's copy of HellaSwag stores "3"
        label = int(label)
    if label is None or label == "":
        raise MinigptError(f"{where} has no label (HellaSwag's test split has none; use its validation file)")
    if not isinstance(label, int) or isinstance(label, bool):
        raise MinigptError(f"{where}: the label must be the index of the right choice, got {label!r}")
    if not 0 <= label < len(choices):
        raise MinigptError(f"{where}: label {label} is out of range for {len(choices)} choices (0 to "
                           f"{len(choices) - 1})")
    return Item(context, tuple(choices), label, where)


@dataclass(frozen=True)
class _Row:
    """One (item, choice): the tokens the model reads, and where the choice's tokens begin among them."""

    item: int
    choice: int
    tokens: tuple[int, ...]
    first: int  # index in `tokens` of the first scored token (>= 1: it is predicted from the one before)


class ChoiceSet:
    """Items encoded once, to be scored as often as wanted (train.py scores them at every evaluation)."""

    def __init__(self, items: list[Item], tokenizer: Tokenizer, context_len: int) -> None:
        self.items = items
        self.rows: list[_Row] = []
        self.cut = 0  # items with at least one row cut to the model's context
        self.choices_cut = 0  # of those, items with a choice longer than the context: scored on its last tokens only
        keep = context_len + 1  # the model reads tokens[:-1]: at most context_len of them
        start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
        for i, item in enumerate(items):
            context = tokenizer.encode_ordinary(item.context) or start
            if not context:  # the first token of a choice would be scored from nothing, a one-token choice not at all
                raise MinigptError(f"{item.where or f'item {i + 1}'}: the context is empty, and the tokenizer has "
                                   f"no end-of-text token to begin it with; give the item a context, or use a "
                                   f"tokenizer with <|endoftext|>")
            cut = choice_cut = False
            for c, choice in enumerate(item.choices):
                tokens = context + tokenizer.encode_ordinary(" " + choice)
                first = len(context)
                if len(tokens) > keep:
                    first -= len(tokens) - keep
                    tokens, cut = tokens[-keep:], True
                choice_cut |= first < 1
                self.rows.append(_Row(i, c, tuple(tokens), max(first, 1)))
            self.cut += cut
            self.choices_cut += choice_cut

    @torch.no_grad()
    def choice_scores(self, model: torch.nn.Module, batch_size: int, device: str | torch.device = "cpu",
                      autocast_dtype: torch.dtype | None = None,
                      progress: bool = False) -> list[list[tuple[float, int]]]:
        """(summed log-likelihood, number of tokens) of every choice of every item; `progress` shows a bar on a
        terminal."""
        device = torch.device(device)
        scores: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(item.choices) for item in self.items]
        order = sorted(range(len(self.rows)), key=lambda r: -len(self.rows[r].tokens))  # little padding per batch
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        try:
            with tqdm(total=len(self.rows), unit="choice", desc="scoring choices", disable=None if progress else True,
                      leave=False) as bar:
                for b in range(0, len(order), batch_size):
                    rows = [self.rows[r] for r in order[b:b + batch_size]]
                    width = len(rows[0].tokens) - 1
                    padded = torch.zeros(len(rows), width + 1, dtype=torch.long)
                    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # which targets belong to a choice
                    for k, row in enumerate(rows):
                        padded[k, :len(row.tokens)] = torch.tensor(row.tokens)
                        scored[k, row.first - 1:len(row.tokens) - 1] = True
                    x, y, scored = padded[:, :-1].to(device), padded[:, 1:].to(device), scored.to(device)
                    with autocast:
                        logits, _ = model(x)
                    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                    sums = (-nll.view_as(y) * scored).sum(1).tolist()
                    for row, total in zip(rows, sums):
                        scores[row.item][row.choice] = (total, len(row.tokens) - row.first)
                    bar.update(len(rows))
        finally:
            model.train(was_training)
        return scores

    def score(self, model: torch.nn.Module, batch_size: int, device: str | torch.device = "cpu",
              autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, float | int]:
        """{"acc", "acc_norm", "n", "cut"}: the share of items answered right by summed and by mean
        log-likelihood, the number of items, and how many were cut to the model's context."""
        scores = self.choice_scores(model, batch_size, device, autocast_dtype, progress)
        return {**accuracies(scores, [item.label for item in self.items]), "cut": self.cut}


def accuracies(scores: list[list[tuple[float, int]]], labels: list[int]) -> dict[str, float | int]:
    """acc (argmax of the summed log-likelihood), acc_norm (argmax of the mean per token) and n; ties go to the
    first choice."""
    right = right_norm = 0
    for choices, label in zip(scores, labels):
        right += _first_max([total for total, _ in choices]) == label
        right_norm += _first_max([total / max(count, 1) for total, count in choices]) == label
    n = len(labels)
    return {"acc": right / n, "acc_norm": right_norm / n, "n": n}


def _first_max(values: list[float]) -> int:
    return values.index(max(values))
