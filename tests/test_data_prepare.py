"""data.prepare: tokens round-trip, the split, dtypes, reuse, checksums, atomicity, caps."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from data import DataError
from data import prepare as prep
from data.prepare import load_prepared, prepare_data, token_dtype
from tokenizer import Tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while naïve café owners count 123 456 €".split()


def make_corpus(folder: Path, n_docs: int, marker_every: int = 0) -> list[str]:
    """n_docs small files with varied text; returns the documents in the order the folder is read (sorted)."""
    rng = np.random.default_rng(n_docs)
    docs = []
    for i in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(5, 40)))
        text = f"Document {i}.\n" + " ".join(words) + "\n"
        if i == 3:
            text += "a literal <|endoftext|> in the text\n"
        docs.append(text)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return docs


def reference_split(docs: list[str], val_fraction: float, stretch_chars: int) -> list[tuple[str, str]]:
    """The documented rule, spelled out slowly: stretches of whole documents of at least stretch_chars; in each,
    the last val_fraction of its characters is held out, cut at the place nearest the exact point within a
    quarter of the held-out share: a document boundary, else after a line end, else before whitespace."""
    stretches, current = [], []
    for doc in docs:
        current.append(doc)
        if sum(map(len, current)) >= stretch_chars:
            stretches.append(current)
            current = []
    stretches += [current] if current else []
    out = []
    for stretch in stretches:
        text = "".join(stretch)
        n = len(text)
        held = min(max(1, round(n * val_fraction)), n - 1)
        target, slack = n - held, max(1, held // 4)
        window = range(max(1, target - slack), min(n - 1, target + slack) + 1)
        ends = {sum(map(len, stretch[:k])) for k in range(1, len(stretch))}

        def nearest(good):
            places = [p for p in window if good(p)]
            return min(places, key=lambda p: (abs(p - target), p)) if places else None

        cut = (nearest(lambda p: p in ends) or nearest(lambda p: text[p - 1] == "\n")
               or nearest(lambda p: text[p].isspace()) or target)
        start = 0
        for doc in stretch:
            if start + len(doc) <= cut:
                out.append(("train", doc))
            elif start >= cut:
                out.append(("val", doc))
            else:
                out += [("train", doc[:cut - start]), ("val", doc[cut - start:])]
            start += len(doc)
    return out


def assert_split_like_reference(data, docs: list[str], val_fraction: float, stretch_chars: int) -> None:
    expected = reference_split(docs, val_fraction, stretch_chars)
    for split, tokens in [("train", data.train_tokens), ("val", data.val_tokens)]:
        assert split_at_eot(tokens, data.tokenizer) == [doc for s, doc in expected if s == split]


def split_at_eot(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a split document by document; each document is preceded by EOT."""
    ids = tokens.tolist()
    starts = [k for k, t in enumerate(ids) if t == tok.eot_id]
    assert starts and starts[0] == 0
    return [tok.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(ids)])]


def prepare(source, cache, **kwargs):
    kwargs = {"vocab_size": 300, "num_proc": 1, "progress": False, **kwargs}
    return prepare_data(str(source), cache, **kwargs)


def test_tokens_round_trip_and_split_holds_out_the_tail_of_each_stretch(tmp_path, monkeypatch):
    docs = make_corpus(tmp_path / "corpus", 30)
    monkeypatch.setattr(prep, "SPLIT_STRETCH_CHARS", 600)  # several stretches, each with its validation tail
    data = prepare(tmp_path / "corpus", tmp_path / "cache", val_fraction=0.1)
    expected = reference_split(docs, 0.1, 600)
    train_docs = [doc for split, doc in expected if split == "train"]
    val_docs = [doc for split, doc in expected if split == "val"]
    assert len(val_docs) >= 4 and "".join(doc for _, doc in expected) == "".join(docs)
    tok = data.tokenizer
    # EOT only between documents: the literal "<|endoftext|>" of document 3 stays ordinary text
    assert split_at_eot(data.train_tokens, tok) == train_docs
    assert split_at_eot(data.val_tokens, tok) == val_docs
    eot = tok.decode([tok.eot_id])
    assert tok.decode(data.train_tokens.tolist()) == "".join(eot + d for d in train_docs)
    meta = data.meta
    assert meta["tokens"] == {"train": len(data.train_tokens), "val": len(data.val_tokens)}
    assert meta["bytes"] == {"train": sum(len(d.encode()) for d in train_docs),
                             "val": sum(len(d.encode()) for d in val_docs)}
    assert meta["documents"] == {"train": len(train_docs), "val": len(val_docs)}
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["eot_id"] == tok.eot_id
    assert meta["tokenizer_checksum"] == tok.checksum and meta["split_rule"] == prep.SPLIT_RULE
    assert data.train_tokens.dtype == np.uint16 and isinstance(data.train_tokens, np.memmap)
    assert json.loads((data.dir / "meta.json").read_text()) == meta
    assert Tokenizer.load(data.tokenizer_path) == tok


def words_text(n_words: int, seed: int, sep: str = " ") -> str:
    rng = np.random.default_rng(seed)
    return sep.join(rng.choice(WORDS, size=n_words))


def test_held_out_share_of_tokens_is_close_to_val_fraction_however_few_documents(tmp_path, capsys):
    """The cases the split by whole documents got wrong: 50 %, one line of two never trained on, no split at all."""
    (tmp_path / "two").mkdir()
    two_files = [words_text(6000, 1) + "\n", words_text(6000, 2) + "\n"]
    for name, text in zip("ab", two_files):
        (tmp_path / "two" / f"{name}.txt").write_text(text, encoding="utf-8")
    two_lines = words_text(6000, 3) + "\n" + words_text(6000, 4) + "\n"
    one_line = words_text(12000, 5)  # about 60 KB and no line break at all
    no_space = words_text(3000, 6, sep="")
    cases = [("two", two_files), ("two-lines.txt", [two_lines]), ("one-line.txt", [one_line]),
             ("no-space.txt", [no_space])]
    for name, text in cases[1:]:
        (tmp_path / name).write_text(text[0], encoding="utf-8")
    for name, docs in cases:
        for fraction in (0.05, 0.2):
            data = prepare(tmp_path / name, tmp_path / "cache", val_fraction=fraction)
            assert_split_like_reference(data, docs, fraction, prep.SPLIT_STRETCH_CHARS)
            share = len(data.val_tokens) / (len(data.train_tokens) + len(data.val_tokens))
            assert abs(share - fraction) < 0.01, (name, fraction, share)
            assert f"{100 * share:.1f}% held out" in capsys.readouterr().out
    data = prepare(tmp_path / "one-line.txt", tmp_path / "cache")
    # cut before a space: the word after it keeps its leading space
    assert split_at_eot(data.val_tokens, data.tokenizer)[0][0] == " "


def test_default_corpus_capped_holds_out_the_share_asked(tmp_path):
    data = prepare_data(None, tmp_path / "cache", vocab_size=300, num_proc=1, progress=False, max_bytes=300_000)
    share = len(data.val_tokens) / (len(data.train_tokens) + len(data.val_tokens))
    assert abs(share - 0.05) < 0.01  # whole files held out 66 % of this corpus


def test_split_is_deterministic_and_parallel_encoding_matches(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus", 40)
    one = prepare(tmp_path / "corpus", tmp_path / "a")
    monkeypatch.setattr(prep, "ENCODE_CHUNK_BYTES", 300)  # many chunks, so that two processes share the work
    two = prepare(tmp_path / "corpus", tmp_path / "b", num_proc=2)
    assert one.dir.name == two.dir.name
    assert one.tokenizer.checksum == two.tokenizer.checksum
    assert np.array_equal(one.train_tokens, two.train_tokens)
    assert np.array_equal(one.val_tokens, two.val_tokens)


def test_tiny_corpora_always_get_a_validation_piece(tmp_path):
    docs = make_corpus(tmp_path / "three", 3)
    data = prepare(tmp_path / "three", tmp_path / "cache")
    assert_split_like_reference(data, docs, 0.05, prep.SPLIT_STRETCH_CHARS)
    assert len(data.val_tokens) > 1
    single = tmp_path / "single.txt"
    lines = [f"line {i} of the only document\n" for i in range(40)]
    single.write_text("".join(lines))
    data = prepare(single, tmp_path / "cache")  # one document: its tail, cut at a line end, validates
    train, val = (split_at_eot(t, data.tokenizer) for t in (data.train_tokens, data.val_tokens))
    assert train[0] + val[0] == "".join(lines) and val[0] == "".join(lines[-2:])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    data = prepare(tiny, tmp_path / "cache")
    assert split_at_eot(data.val_tokens, data.tokenizer) == ["b"]
    tiny.write_text("a")
    with pytest.raises(DataError, match="a single character"):
        prepare(tiny, tmp_path / "cache")


def test_dtype_is_uint16_up_to_65536_ids_else_uint32(tmp_path, monkeypatch):
    assert token_dtype(300) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == token_dtype(200_000) == np.uint32
    make_corpus(tmp_path / "corpus", 10)
    small = prepare(tmp_path / "corpus", tmp_path / "a")
    monkeypatch.setattr(prep, "token_dtype", lambda vocab_size: np.dtype(np.uint32))  # as for a huge vocabulary
    wide = prepare(tmp_path / "corpus", tmp_path / "b")
    assert wide.meta["dtype"] == "uint32" and wide.train_tokens.dtype == np.uint32
    assert (wide.dir / "train.bin").stat().st_size == 4 * len(wide.train_tokens)
    assert np.array_equal(wide.train_tokens, small.train_tokens)


def test_says_its_throughput(tmp_path, capsys):
    make_corpus(tmp_path / "corpus", 12)
    prepared = prepare(tmp_path / "corpus", tmp_path / "cache")
    said = capsys.readouterr().out
    found = re.search(r"encoded ([\d.]+) MB in ([\d.]+) s by 1 process: ([\d.]+) MB/s, ([\d,]+) tokens/s\n", said)
    assert found, said
    megabytes, seconds, mb_per_s, tokens_per_s = float(found[1]), float(found[2]), float(found[3]), \
        int(found[4].replace(",", ""))
    n_bytes, tokens = sum(prepared.meta["bytes"].values()), sum(prepared.meta["tokens"].values())
    assert megabytes == round(n_bytes / 1e6, 1) and seconds >= 0 and mb_per_s > 0
    # both rates are of the same time: MB/s is the token rate times bytes per token (up to its printed rounding)
    assert abs(tokens_per_s * n_bytes / tokens / 1e6 - mb_per_s) <= 0.005 + 1e-5


def test_second_call_reuses_without_encoding(tmp_path, monkeypatch, capsys):
    make_corpus(tmp_path / "corpus", 12)
    first = prepare(tmp_path / "corpus", tmp_path / "cache")
    stamp = (first.dir / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was encoded again")

    monkeypatch.setattr(prep, "_encode_chunks", fail)
    monkeypatch.setattr(prep, "_train_tokenizer", fail)
    capsys.readouterr()
    again = prepare(tmp_path / "corpus", tmp_path / "cache")
    assert "reusing prepared data in" in capsys.readouterr().out
    assert again.dir == first.dir and (again.dir / "train.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(again.train_tokens, first.train_tokens)
    # the tokenizer it trained, given back (as on resume from a checkpoint's tokenizer.json), finds it too
    copy = tmp_path / "tok.json"
    first.tokenizer.save(copy)
    assert prepare(tmp_path / "corpus", tmp_path / "cache", tokenizer=copy).dir == first.dir
    monkeypatch.undo()
    # another tokenizer makes another folder
    other = Tokenizer.train(["other text, other merges"] * 4, vocab_size=290, progress=False)
    with_other = prepare(tmp_path / "corpus", tmp_path / "cache", tokenizer=other)
    assert with_other.dir != first.dir and with_other.tokenizer.checksum == other.checksum
    assert prepare(tmp_path / "corpus", tmp_path / "cache", tokenizer=other).dir == with_other.dir
    # changed settings or a changed file make a new folder
    assert prepare(tmp_path / "corpus", tmp_path / "cache", val_fraction=0.2).dir != first.dir
    monkeypatch.setattr(prep, "SPLIT_RULE", prep.SPLIT_RULE + 1)  # another split rule: never the old folder
    assert prepare(tmp_path / "corpus", tmp_path / "cache").dir != first.dir
    monkeypatch.undo()
    (tmp_path / "corpus" / "doc000.txt").write_text("changed text\n")
    assert prepare(tmp_path / "corpus", tmp_path / "cache").dir != first.dir


def test_preparations_of_the_same_data_at_once_build_it_once(tmp_path, monkeypatch, capsys):
    """As the ranks of a torchrun job do: the first builds, the other waits on the lock, then reuses."""
    make_corpus(tmp_path / "corpus", 12)
    builds = []
    build = prep._build

    def slow_build(*args, **kwargs):
        builds.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough for the other preparation to find the folder missing and wait
        return build(*args, **kwargs)

    monkeypatch.setattr(prep, "_build", slow_build)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: prepare(tmp_path / "corpus", tmp_path / "cache"), range(2))
    assert len(builds) == 1
    out = capsys.readouterr().out
    assert "waiting for another process that is preparing" in out and "reusing prepared data in" in out
    assert first.dir == second.dir
    assert np.array_equal(first.train_tokens, second.train_tokens)


def test_mismatched_tokenizer_checksum_is_refused(tmp_path):
    make_corpus(tmp_path / "corpus", 12)
    data = prepare(tmp_path / "corpus", tmp_path / "cache")
    with pytest.raises(DataError, match="made with another tokenizer"):
        load_prepared(data.dir, expected_checksum="0" * 64)
    other = Tokenizer.train(["some other text entirely"] * 3, vocab_size=280, progress=False)
    other.save(data.tokenizer_path)  # the folder's tokenizer no longer matches its tokens
    with pytest.raises(DataError, match="is not the tokenizer these tokens were made with"):
        prepare(tmp_path / "corpus", tmp_path / "cache")


def test_interrupted_preparation_leaves_nothing(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus", 12)
    real = prep._encode_chunks

    def interrupted(*args, **kwargs):
        for k, chunk in enumerate(real(*args, **kwargs)):
            if k == 1:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(prep, "ENCODE_CHUNK_BYTES", 100)
    monkeypatch.setattr(prep, "_encode_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "corpus", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no folder, not even a temporary one
    monkeypatch.undo()
    data = prepare(tmp_path / "corpus", tmp_path / "cache")
    assert data.meta["documents"]["train"] > 0


def test_temporary_folder_of_a_killed_preparation_is_removed(tmp_path):
    make_corpus(tmp_path / "corpus", 5)
    folder = prepare(tmp_path / "corpus", tmp_path / "cache").dir
    shutil.rmtree(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / "cache" / f".{folder.name}.tmp-{host}-{int(dead.stdout)}-0123abcd"
    running = tmp_path / "cache" / f".{folder.name}.tmp-{host}-{os.getpid()}-4567ef01"
    for leftover in (killed, running):
        leftover.mkdir()
        (leftover / "train.bin").write_bytes(b"\0\0")
    assert prepare(tmp_path / "corpus", tmp_path / "cache").dir == folder
    assert not killed.exists() and running.exists()  # a live process's preparation is left alone


def test_truncated_or_garbled_folder_is_refused(tmp_path):
    make_corpus(tmp_path / "corpus", 12)
    data = prepare(tmp_path / "corpus", tmp_path / "cache")
    with open(data.dir / "val.bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(DataError, match="val.bin is missing or truncated"):
        load_prepared(data.dir)
    (data.dir / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        prepare(tmp_path / "corpus", tmp_path / "cache")


def test_max_bytes_and_tokenizer_sample_bound_what_is_read(tmp_path, monkeypatch):
    docs = make_corpus(tmp_path / "corpus", 40)
    data = prepare(tmp_path / "corpus", tmp_path / "cache", max_bytes=1000, val_fraction=0.25)
    used = data.meta["bytes"]["train"] + data.meta["bytes"]["val"]
    assert 900 < used <= 1000
    kept = "".join(split_at_eot(data.train_tokens, data.tokenizer) + split_at_eot(data.val_tokens, data.tokenizer))
    assert "".join(docs).startswith(kept)  # the documents in corpus order, up to max_bytes

    seen = []
    real_train = Tokenizer.train

    def recording_train(texts, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return real_train(texts, **kwargs)

    monkeypatch.setattr(prep.Tokenizer, "train", recording_train)
    data = prepare(tmp_path / "corpus", tmp_path / "cache2", tokenizer_max_bytes=700, val_fraction=0.9)
    assert 500 < sum(len(t.encode()) for t in seen) <= 700  # the last one cut at a line end
    val = "".join(split_at_eot(data.val_tokens, data.tokenizer))
    assert not any(text in val for text in seen)  # the tokenizer never sees validation text


def test_errors_mode_and_bad_settings(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 5)
    (corpus / "latin1.txt").write_bytes("\nolé\n".encode("latin-1") * 3)
    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8 at byte offset 3"):
        prepare(corpus, tmp_path / "cache")
    data = prepare(corpus, tmp_path / "cache", errors="replace")
    assert "\nol\ufffd\n" in data.tokenizer.decode(data.train_tokens.tolist() + data.val_tokens.tolist())
    with pytest.raises(DataError, match="val_fraction"):
        prepare(corpus, tmp_path / "cache", val_fraction=1.0)
    with pytest.raises(DataError, match="max_bytes must be a positive"):
        prepare(corpus, tmp_path / "cache", max_bytes=0)
    with pytest.raises(DataError, match="no tokenizer file"):
        prepare(corpus, tmp_path / "cache", tokenizer=tmp_path / "missing.json")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="the corpus has no text"):
        prepare(tmp_path / "blank", tmp_path / "cache")


def test_a_dataset_source_prepares_like_the_same_local_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"Row {i}: " + " ".join(WORDS[i % 7:i % 7 + 6]) + "\n" for i in range(25)]
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    local = prepare(path, tmp_path / "a", text_field="body")
    through_datasets = prepare_data(str(path), tmp_path / "b", dataset="json", text_field="body", vocab_size=300,
                                    num_proc=1, progress=False)
    assert np.array_equal(local.train_tokens, through_datasets.train_tokens)
    assert np.array_equal(local.val_tokens, through_datasets.val_tokens)
    assert "Hugging Face dataset 'json'" in through_datasets.meta["source"]


def test_says_when_a_setting_cannot_take_effect(tmp_path, capsys):
    make_corpus(tmp_path / "corpus", 5)
    data = prepare(tmp_path / "corpus", tmp_path / "cache", text_field="body", vocab_size=5000)
    out = capsys.readouterr().out
    assert "the text field 'body' (--text-field) does not apply to folder" in out
    assert f"the tokenizer learned {data.tokenizer.vocab_size} ids, fewer than the 5000 asked for" in out
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"row {i} " * 20}) + "\n" for i in range(20)))
    prepare(rows, tmp_path / "cache", text_field="body", vocab_size=260)
    out = capsys.readouterr().out
    assert "--text-field" not in out and "fewer than" not in out
