"""data.sources: every kind of corpus, what a document is, and the errors a user can run into."""

import gzip
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError
from data import sources
from data.sources import default_corpus_description, iter_documents, open_source


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def test_small_text_file_is_one_document(tmp_path):
    path = write(tmp_path / "book.txt", "\ufeffFirst line.\n\nSecond paragraph, déjà vu.\n")
    assert list(iter_documents(str(path))) == ["First line.\n\nSecond paragraph, déjà vu.\n"]  # BOM dropped


def test_large_text_file_is_cut_at_blank_lines_and_joins_back(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WHOLE_FILE_MAX_BYTES", 100)
    monkeypatch.setattr(sources, "DOC_BYTES", 40)
    paragraphs = [f"para {i} " + "w " * (i % 5) + "\n" for i in range(60)]  # at most 20 bytes each
    text = "\n".join(paragraphs)  # blank line between paragraphs
    docs = list(iter_documents(str(write(tmp_path / "dump.txt", text))))
    assert "".join(docs) == text
    assert len(docs) > 5
    for doc in docs[:-1]:
        assert 40 <= len(doc.encode()) <= 80
        assert doc.endswith("\n\n")  # each cut is just after a blank line


def test_large_file_without_line_ends_never_splits_a_character(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WHOLE_FILE_MAX_BYTES", 100)
    monkeypatch.setattr(sources, "DOC_BYTES", 41)
    text = "é€😀" * 200  # 2-, 3- and 4-byte characters, no line end anywhere
    docs = list(iter_documents(str(write(tmp_path / "one-line.txt", text))))
    assert "".join(docs) == text
    assert len(docs) > 5 and all(len(d.encode()) <= 82 for d in docs)


def test_folder_is_recursive_sorted_and_skips_hidden_and_binary_files(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "zed")
    write(tmp_path / "a" / "y" / "deep.txt", "deep")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / ".hidden.txt", "hidden")
    write(tmp_path / ".git" / "config", "hidden folder")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "json one"}, {"text": "json two"}])
    # sorted by path components: the folder "a" (and all below it) comes before the file "a.txt"
    assert list(iter_documents(str(tmp_path))) == ["deep", "zed", "ay", "bee", "json one", "json two"]
    assert "1 binary file skipped" in open_source(str(tmp_path)).description


def test_glob_matches_sorted_files(tmp_path):
    for name, text in [("x/2.txt", "two"), ("x/1.txt", "one"), ("x/sub/3.txt", "three"), ("x/skip.md", "no")]:
        write(tmp_path / name, text)
    assert list(iter_documents(str(tmp_path / "x" / "**" / "*.txt"))) == ["one", "two", "three"]
    assert list(iter_documents(str(tmp_path / "x" / "*.txt"))) == ["one", "two"]
    with pytest.raises(DataError, match="no text files match"):
        open_source(str(tmp_path / "x" / "*.csv"))


def test_jsonl_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "body": "A"}, {"text": None, "body": "B"},
                                              {"text": "c", "body": "C"}])
    write(path, path.read_text() + "\n  \n")  # blank lines are skipped
    assert list(iter_documents(str(path))) == ["a", "c"]  # a null text is an empty document: skipped
    assert list(iter_documents(str(path), text_field="body")) == ["A", "B", "C"]


def test_jsonl_errors_name_the_line_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text"}])
    with pytest.raises(DataError, match=r"line 2 has no field 'text' \(fields: 'content'\).*--text-field"):
        list(iter_documents(str(path)))
    write(path, '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        list(iter_documents(str(path)))
    write_jsonl(path, [{"text": 42}])
    with pytest.raises(DataError, match="holds int, not text"):
        list(iter_documents(str(path)))


def test_parquet_column_streamed(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"row {i}" for i in range(2500)]  # more than one record batch
    pq.write_table(pa.table({"id": list(range(2500)), "content": texts}), path, row_group_size=700)
    assert list(iter_documents(str(path), text_field="content")) == texts
    with pytest.raises(DataError, match=r"no column 'text' \(columns: 'id', 'content'\)"):
        list(iter_documents(str(path)))
    bad = write(tmp_path / "bad.parquet", "not parquet at all")
    with pytest.raises(DataError, match="cannot read .* as Parquet"):
        list(iter_documents(str(bad)))


def test_datasets_builders_on_local_files(tmp_path):
    rows = [{"text": f"document {i}", "n": i} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    expected = [row["text"] for row in rows]
    assert list(iter_documents(str(jsonl), dataset="json")) == expected
    assert list(iter_documents(str(parquet), dataset="parquet")) == expected
    with pytest.raises(DataError, match="no field 'body'.*--text-field"):
        list(iter_documents(str(jsonl), dataset="json", text_field="body"))
    src = open_source(str(jsonl), dataset="json")
    assert src.kind == "dataset" and src.files == (jsonl,)


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
        "validation": datasets.Dataset.from_dict({"text": ["v0"]}),
    }).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(dataset=str(tmp_path / "saved"))) == ["t0", "t1"]
    assert list(iter_documents(dataset=str(tmp_path / "saved"), split="validation")) == ["v0"]
    with pytest.raises(DataError, match="no split 'test'"):
        list(iter_documents(dataset=str(tmp_path / "saved"), split="test"))
    assert open_source(dataset=str(tmp_path / "saved")).kind == "saved"


def test_unreachable_hub_dataset_is_a_one_line_error(tmp_path):
    code = ("from data.sources import iter_documents\n"
            "try:\n    next(iter_documents(dataset='nobody/no-such-dataset'))\n"
            "except ValueError as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # offline: fail at once, no retries
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("DataError could not read dataset 'nobody/no-such-dataset'")
    assert len(out.strip().splitlines()) == 1


def test_non_utf8_error_names_file_and_offset_and_replace_mode_reads_it(tmp_path):
    path = write(tmp_path / "latin1.txt", "café au lait".encode("latin-1"))
    with pytest.raises(DataError) as error:
        list(iter_documents(str(path)))
    message = str(error.value)
    assert str(path) in message and "byte offset 3" in message and "0xe9" in message
    assert 'errors="replace"' in message and "\n" not in message
    assert list(iter_documents(str(path), errors="replace")) == ["caf\ufffd au lait"]
    raw = b'{"text": "ok"}\n{"text": "bad \xff"}\n'
    jsonl = write(tmp_path / "d.jsonl", raw)
    with pytest.raises(DataError, match=f"d.jsonl is not valid UTF-8 at byte offset {raw.index(0xFF)} "):
        list(iter_documents(str(jsonl)))
    with pytest.raises(DataError, match="unknown errors mode"):
        list(iter_documents(str(path), errors="loose"))


def test_an_archive_is_named_with_a_step_that_helps_not_errors_replace(tmp_path):
    gz = write(tmp_path / "corpus.txt.gz", gzip.compress(b"some text\n" * 100))
    for errors in ("strict", "replace"):  # replacing its bytes would only make garbage
        with pytest.raises(DataError, match=r"corpus.txt.gz is gzip-compressed, not text; decompress it first "
                                            r"\(gunzip -k .*corpus.txt.gz\)"):
            list(iter_documents(str(gz), errors=errors))
    table = pa.table({"text": ["a", "b"]})
    pq.write_table(table, tmp_path / "rows.data")  # Parquet under another name
    with pytest.raises(DataError, match="is a Parquet file, not text; name it .parquet"):
        list(iter_documents(str(tmp_path / "rows.data")))
    text = write(tmp_path / "BZh.txt", "BZh is how this text happens to begin\n")  # text that starts like bzip2
    assert list(iter_documents(str(text))) == ["BZh is how this text happens to begin\n"]


def test_non_utf8_offset_is_exact_in_a_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WHOLE_FILE_MAX_BYTES", 100)
    monkeypatch.setattr(sources, "DOC_BYTES", 32)
    raw = b"line of text\n" * 30 + b"bad \x80 byte\n" + b"more\n" * 10
    path = write(tmp_path / "big.txt", raw)
    bad_offset = raw.index(b"\x80")
    with pytest.raises(DataError, match=f"at byte offset {bad_offset} "):
        list(iter_documents(str(path)))
    assert "".join(iter_documents(str(path), errors="replace")) == raw.decode("utf-8", "replace")


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder: .*nowhere.*--dataset"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no text files"):
        open_source(str(tmp_path / "empty"))
    write(tmp_path / "bin" / "x.bin", b"\x00\x01\x02")
    with pytest.raises(DataError, match="has no text files"):
        open_source(str(tmp_path / "bin"))


def test_default_corpus_is_the_standard_library_source():
    src = open_source()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert src.kind == "default" and len(src.files) > 100
    for path in src.files:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py"
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts)
    keys = [p.relative_to(root).parts for p in src.files]
    assert keys == sorted(keys)
    assert root / "os.py" in src.files
    first = next(path for path in src.files if path.stat().st_size > 0)
    assert next(iter_documents()) == first.read_text(encoding="utf-8", errors="replace")
    assert str(root) in default_corpus_description() and f"{len(src.files)} files" in src.description


def test_identity_changes_when_a_file_changes(tmp_path):
    path = write(tmp_path / "a.txt", "one")
    before = open_source(str(path)).identity()
    write(path, "one and more")
    assert open_source(str(path)).identity() != before
