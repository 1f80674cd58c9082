"""Multiple-choice evaluation: batched scores equal a slow per-item reference for every position kind, an imported
GPT-2 scores as transformers' GPT2LMHeadModel does, bad files are one-line errors naming the line, and training
logs acc / acc_norm at every evaluation."""
import json
import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt import GPT, GPTConfig, MinigptError
from minigpt.checkpoint import load_model
from minigpt.choices import ChoiceSet, Item, accuracies, read_items
from minigpt.trainer import train
from tokenizer import Tokenizer

from helpers import WORDS, gpt2_style_tokenizer, records, tiny_config, write_corpus
from test_hf import cli, one_line_error, sample_cli

BLOCK = 16


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_items(count: int, seed: int = 0) -> list[Item]:
    """Contexts from 0 to 30 words (the longest rows exceed a 16-token context), 2 to 5 choices of 1 to 8 words."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        choices = tuple(sentence(rng, rng.randint(1, 8)) for _ in range(rng.randint(2, 5)))
        items.append(Item(sentence(rng, rng.randint(0, 30)), choices, rng.randrange(len(choices))))
    return items


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    text = write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", sentences=400).read_text()
    return Tokenizer.train(text, vocab_size=300, special_tokens=["<|endoftext|>"])


def reference_scores(model, tok: Tokenizer, item: Item, block_size: int, encode=None) -> list[tuple[float, int]]:
    """The obvious way, one choice at a time: the model reads context + choice alone (its last block_size + 1
    tokens), and the log-probabilities of the choice's tokens that remain are added up in float64."""
    encode = encode or tok.encode_ordinary
    context = encode(item.context) or [tok.eot_id]
    scores = []
    for choice in item.choices:
        row = context + encode(" " + choice)
        choice_at = range(len(context), len(row))
        drop = max(0, len(row) - (block_size + 1))
        row = row[drop:]
        with torch.no_grad():
            logits = model(torch.tensor([row[:-1]]))
            logits = logits[0] if isinstance(logits, tuple) else logits.logits
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        scored = [p - drop for p in choice_at if p - drop >= 1]
        scores.append((sum(logp[p - 1, row[p]].item() for p in scored), len(scored)))
    return scores


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "alibi", "rope"])
def test_batched_scores_equal_the_per_item_reference(tok, positions):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                          positions=positions)).eval()
    items = make_items(40)
    expected = [reference_scores(model, tok, item, BLOCK) for item in items]
    choices = ChoiceSet(items, tok, BLOCK)
    assert 0 < choices.cut < len(items)  # some items were cut to the context, some not
    for batch_size in (1, 7, 500):
        got = choices.choice_scores(model, batch_size)
        for mine, theirs in zip(got, expected):
            assert [n for _, n in mine] == [n for _, n in theirs]
            assert [s for s, _ in mine] == pytest.approx([s for s, _ in theirs], rel=1e-5, abs=1e-4)
    result = choices.score(model, 7)
    reference = accuracies(expected, [item.label for item in items])
    assert result == {**reference, "cut": choices.cut}
    assert result["acc"] != result["acc_norm"]  # the two differ on these items: both are really computed


def test_acc_and_acc_norm_by_hand():
    scores = [[(-4.0, 4), (-3.0, 1)],  # acc picks 1 (higher sum); acc_norm picks 0 (-1 a token beats -3)
              [(-2.0, 2), (-2.0, 2)],  # a tie goes to the first
              [(-9.0, 3), (-1.0, 2)]]  # both pick 1
    assert accuracies(scores, [0, 1, 1]) == {"acc": 1 / 3, "acc_norm": 2 / 3, "n": 3}


def test_a_choice_is_encoded_apart_from_its_context(tok):
    """" " + choice is encoded on its own, so its tokens are the same whatever the context ends with."""
    item = Item("the cat se", ("es a dog", "ees"), 0)
    rows = ChoiceSet([item], tok, 100).rows
    context = tok.encode_ordinary("the cat se")
    assert [list(r.tokens) for r in rows] == [context + tok.encode_ordinary(" es a dog"),
                                              context + tok.encode_ordinary(" ees")]
    assert all(r.first == len(context) for r in rows)


# ------------------------------------------------------------------------------------------- GPT-2 as reference
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random GPT2LMHeadModel saved by save_pretrained, with a byte-level BPE trained by `tokenizers`: the
    layout of the hub's gpt2 folder. Its 24 positions cut the longest items."""
    folder = tmp_path_factory.mktemp("gpt2")
    text = write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", sentences=400).read_text()
    hf_tok = gpt2_style_tokenizer([text], 320)
    hf_tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=24, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder, safe_serialization=True)
    return folder


def test_imported_gpt2_scores_as_transformers_does(gpt2_dir, tmp_path):
    """Our import of a GPT-2 folder and our tokenizer of its files give transformers' log-likelihoods, so the
    real GPT-2 124M gives its published 0.2859 / 0.2955 on HellaSwag here too."""
    theirs = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_tok = HFTokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    items = [item for item in make_items(30, seed=1) if item.context]
    expected = [reference_scores(theirs, Tokenizer.from_huggingface(gpt2_dir), item, 24,
                                 encode=lambda text: hf_tok.encode(text).ids) for item in items]
    ours = GPT.from_pretrained(str(gpt2_dir))
    choices = ChoiceSet(items, Tokenizer.from_huggingface(gpt2_dir), ours.config.block_size)
    assert choices.cut > 0
    for mine, reference in zip(choices.choice_scores(ours, 5), expected):
        assert [n for _, n in mine] == [n for _, n in reference]
        assert [s for s, _ in mine] == pytest.approx([s for s, _ in reference], abs=1e-4)

    path = tmp_path / "hellaswag.jsonl"  # HellaSwag's own field names; the CLI reads them
    path.write_text("".join(json.dumps({"ind": k, "ctx": item.context, "endings": list(item.choices),
                                        "label": item.label, "split": "val"}) + "\n"
                            for k, item in enumerate(items)))
    result = cli(sample_cli(), "--init-from", str(gpt2_dir), "--eval-choices", str(path), "--json",
                 "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported == {**accuracies(expected, [item.label for item in items]), "cut": choices.cut,
                        "file": str(path)}
    assert f"{choices.cut} of {len(items)} items were longer than the model's context" in result.stderr
    limited = json.loads(cli(sample_cli(), "--init-from", str(gpt2_dir), "--eval-choices", str(path), "--json",
                             "--limit", "5").stdout)
    assert limited["n"] == 5


def test_a_choice_longer_than_the_context_is_said_to_be_scored_on_its_last_tokens(gpt2_dir, tmp_path):
    """The note said every cut item had its context cut, also when a choice alone filled the context and lost its
    first tokens (so that its sum covers only part of it)."""
    long = " ".join(["word"] * 60)
    items = [Item("A man", (long, "sits."), 1), Item(long, ("runs.", "sits."), 0), Item("A cat", ("x", "y"), 0)]
    choices = ChoiceSet(items, Tokenizer.from_huggingface(gpt2_dir), 24)
    assert (choices.cut, choices.choices_cut) == (2, 1)
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "label": i.label}) + "\n"
                            for i in items))
    result = cli(sample_cli(), "--init-from", str(gpt2_dir), "--eval-choices", str(path), "--json")
    assert "2 of 3 items were longer than the model's context of 24" in result.stderr
    assert "in 1 a choice alone was that long, and only its last tokens were scored" in result.stderr


# ---------------------------------------------------------------------------------------------- reading files
def test_both_forms_blank_lines_string_labels_and_limit(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", "sits.", "eats.", "flies."], "label": 2,
                                "activity_label": "x"}) + "\n\n"
                    + json.dumps({"context": "1 + 1 =", "choices": ["2", "3"], "label": "0"}) + "\n")
    assert read_items(path) == [Item("A man", ("runs.", "sits.", "eats.", "flies."), 2), Item("1 + 1 =", ("2", "3"), 0)]
    assert len(read_items(path, limit=1)) == 1


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "line 2: label 2 is out of range for 2 choices (0 to 1)"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": -1}', "line 2: label -1 is out of range"),
    ('{"ctx": "a", "endings": ["b", "c"]}', "line 2 has no label"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": "b"}', "line 2: the label must be the index"),
    ('{"ctx": "a", "endings": ["b"], "label": 0}', "line 2: the choices must be a list of at least 2 strings"),
    ('{"ctx": "a", "endings": "bc", "label": 0}', "line 2: the choices must be a list"),
    ('{"ctx": 3, "endings": ["b", "c"], "label": 0}', "line 2: the context must be a string"),
    ('{"question": "a", "answers": ["b", "c"], "label": 0}', "line 2 has neither ctx + endings"),
    ('["a", "b"]', "line 2 is not a JSON object"),
    ('{"ctx": "a", ', "line 2 is not JSON"),
])
def test_a_bad_line_is_named_by_its_number(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n")
    with pytest.raises(MinigptError, match=f"^{path} " + message.replace("+", r"\+").replace("(", r"\(")
                       .replace(")", r"\)")):
        read_items(path)


def test_an_empty_context_without_an_end_of_text_token_is_refused_by_its_line(tok, tmp_path):
    """Without <|endoftext|> to begin it, an empty context leaves a one-token choice nothing to be scored on: a
    score of 0 that beats every real log-likelihood. With it, the item is scored from that token."""
    no_eot = Tokenizer.train(tok.decode(list(range(256, 299))) * 20, vocab_size=280, special_tokens=[], progress=False)
    assert no_eot.eot_id is None
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"context": "the cat", "choices": ["sees", "eats"], "label": 0}) + "\n"
                    + json.dumps({"context": "", "choices": ["a", "the dog"], "label": 1}) + "\n")
    with pytest.raises(MinigptError, match=f"^{path} line 2: the context is empty, and the tokenizer has no "
                                           f"end-of-text token"):
        ChoiceSet(read_items(path), no_eot, BLOCK)
    with pytest.raises(MinigptError, match="^item 1: the context is empty"):
        ChoiceSet([Item("", ("a", "b"), 0)], no_eot, BLOCK)
    rows = ChoiceSet(read_items(path), tok, BLOCK).rows
    assert rows[2].tokens[0] == tok.eot_id and rows[2].first == 1  # "a" is scored, after the end-of-text token


def test_bad_files_are_one_line_errors_from_the_cli(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(cli(sample_cli(), "--eval-choices", str(empty)), "holds no items")
    one_line_error(cli(sample_cli(), "--eval-choices", str(tmp_path / "missing.jsonl")), "cannot read")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 7}\n')
    one_line_error(cli(sample_cli(), "--eval-choices", str(bad)), "bad.jsonl line 1: label 7 is out of range")
    one_line_error(cli(sample_cli(), "--eval-choices", str(bad), "--limit", "0"), "--limit must be >= 1")


# ------------------------------------------------------------------------------------------------- in training
def test_training_logs_acc_and_acc_norm_at_every_evaluation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": item.context, "choices": list(item.choices),
                                         "label": item.label}) + "\n" for item in make_items(12)))
    out = train(tiny_config(corpus, tmp_path / "cache", tmp_path / "out", max_iters=6, eval_interval=3,
                            eval_iters=1, eval_choices=str(items)))
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all(e["choices_n"] == 12 and 0 <= e["choices_acc"] <= 1 and 0 <= e["choices_acc_norm"] <= 1
               for e in evals)
    model, tokenizer, config = load_model(out)  # the final checkpoint is the model of the last evaluation
    again = ChoiceSet(read_items(items), tokenizer, config["model"]["block_size"]).score(model, 8)
    assert {k: evals[-1][f"choices_{k}"] for k in again} == again


def test_a_bad_choices_file_stops_training_before_the_data_is_prepared(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a"}\n')
    with pytest.raises(MinigptError, match="bad.jsonl line 2 has neither"):
        train(tiny_config(corpus, tmp_path / "cache", tmp_path / "out", eval_choices=str(bad)))
    assert not any((tmp_path / "cache").glob("corpus-*"))
