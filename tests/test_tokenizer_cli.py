"""CLI smoke tests: `python -m tokenizer ...` works end to end and bad input gives one line, exit 2, no file."""
import gzip
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenizer", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
                          timeout=120)


def cli_at_a_terminal(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run with stdin a terminal that never types anything: a command that reads stdin there would wait forever."""
    main, terminal = pty.openpty()
    try:
        return subprocess.run([sys.executable, "-m", "tokenizer", *args], stdin=terminal, capture_output=True,
                              text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=30)
    finally:
        os.close(main)
        os.close(terminal)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tokenizer").glob("*.py")))
    (d / "a.txt").write_text(text, encoding="utf-8")
    (d / "b.txt").write_text("Grüße aus Köln 😀\n" * 50, encoding="utf-8")
    r = cli("train", "--input", "a.txt", "b.txt", "--vocab-size", "500", "--output", "tok.json", "--quiet",
            cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def test_train_writes_a_loadable_tokenizer(workdir):
    tok = Tokenizer.load(workdir / "tok.json")
    assert tok.vocab_size == 500 and tok.eot_id == 499
    assert tok.decode(tok.encode("Grüße aus Köln 😀")) == "Grüße aus Köln 😀"


def test_encode_decode_show_info(workdir):
    text = "def f(x):\n    return 'Grüße' 😀"
    enc = cli("encode", "-t", "tok.json", text, cwd=workdir)
    assert enc.returncode == 0, enc.stderr
    ids = [int(x) for x in enc.stdout.split()]
    assert ids == Tokenizer.load(workdir / "tok.json").encode(text)
    dec = cli("decode", "-t", "tok.json", stdin=enc.stdout, cwd=workdir)
    assert dec.returncode == 0 and dec.stdout == text
    show = cli("show", "-t", "tok.json", "Köln <|endoftext|>", "--allowed-special", "all", cwd=workdir)
    assert show.returncode == 0 and "[<|endoftext|>]" in show.stdout and show.stdout.startswith("[")
    info = cli("info", "-t", "tok.json", "--file", "b.txt", cwd=workdir)
    assert info.returncode == 0 and "vocab_size     500" in info.stdout and "bytes/token" in info.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--input", "missing.txt", "--vocab-size", "300", "--output", "o.json"], "does not exist"),
    (["train", "--input", "void", "--vocab-size", "300", "--output", "o.json"], "folder void has no text files"),
    (["train", "--input", "a.txt.gz", "--vocab-size", "300", "--output", "o.json"], "gunzip -k a.txt.gz"),
    (["train", "--input", "rows.jsonl", "--vocab-size", "300", "--output", "o.json"], "prepare_data('rows.jsonl'"),
    (["train", "--input", "a.txt.gz", "--errors", "replace", "--vocab-size", "300", "--output", "o.json"],
     "gzip-compressed"),
    (["train", "--input", "bad.txt", "--vocab-size", "300", "--output", "o.json"], "offset 6"),
    (["train", "--input", "empty.txt", "--vocab-size", "300", "--output", "o.json"], "empty"),
    (["train", "--input", "a.txt", "--vocab-size", "100", "--output", "o.json"], "too small"),
    (["train", "--input", "a.txt", "--vocab-size", "300", "--pattern", "[a-", "--output", "o.json"],
     "invalid split pattern"),
    (["train", "--input", "a.txt", "--vocab-size", "300", "--output", "nodir/o.json"], "does not exist"),
    (["encode", "-t", "tok.json", "x <|endoftext|>"], "allowed-special"),
    (["decode", "-t", "tok.json", "1", "100000"], "cannot decode id 100000"),
    (["decode", "-t", "tok.json", "1", "two"], "not a token id"),
    (["decode", "-t", "tok.json", "--", "--5"], "'--5' is not a token id"),
    (["decode", "-t", "tok.json", "1", "\u00b2"], "'\u00b2' is not a token id"),
    (["info", "-t", "a.txt"], "not a valid tokenizer JSON"),
    (["info", "-t", "tok.tiktoken"], "Tokenizer.from_tiktoken('tok.tiktoken'"),
    (["info", "-t", "tok.json", "--top", "-1"], "--top must be 0 or more"),
    (["info", "-t", "tok.json", "--file", "missing.txt"], "input file missing.txt does not exist"),
    (["info", "-t", "tok.json", "--file", "bad.txt"], "--errors replace"),
    (["encode", "-t", "tok.json", "--input", "bad.txt"], "--errors replace"),
    (["encode", "-t", "tok.json", "--allowed-special", "<|pad|>", "hi"], "'<|pad|>' is not a special token"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(workdir, args, message):
    (workdir / "bad.txt").write_bytes(b"hello \xff\xfe world")
    (workdir / "empty.txt").write_bytes(b"")
    (workdir / "void").mkdir(exist_ok=True)
    (workdir / "a.txt.gz").write_bytes(gzip.compress((workdir / "b.txt").read_bytes()))
    Tokenizer.load(workdir / "tok.json").save_tiktoken(workdir / "tok.tiktoken")
    (workdir / "rows.jsonl").write_text('{"text": "a row"}\n')
    (workdir / "o.json").unlink(missing_ok=True)  # so that one case that wrongly wrote it fails alone
    r = cli(*args, cwd=workdir)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""  # checked before anything is printed
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (workdir / "o.json").exists()


@pytest.mark.parametrize("inputs", [["c.txt"], ["own"], ["b.txt", "own/*.txt"]])
def test_train_refuses_to_write_over_its_own_input(workdir, inputs):
    # --output among the inputs (the file itself, or one found in a folder or glob) would destroy the corpus
    (workdir / "own").mkdir(exist_ok=True)
    text = "hello world, the corpus itself\n" * 20
    for f in (workdir / "c.txt", workdir / "own" / "c.txt"):
        f.write_text(text, encoding="utf-8")
    output = "c.txt" if inputs == ["c.txt"] else "own/c.txt"
    r = cli("train", "--input", *inputs, "--vocab-size", "300", "--output", output, "--quiet", cwd=workdir)
    assert r.returncode == 2 and "is one of the --input files" in r.stderr and "Traceback" not in r.stderr
    assert (workdir / output).read_text(encoding="utf-8") == text


def test_replace_errors_option_trains_on_invalid_utf8(workdir):
    (workdir / "bad.txt").write_bytes(b"hello \xff\xfe world\n" * 20)
    r = cli("train", "--input", "bad.txt", "--vocab-size", "270", "--errors", "replace", "--special",
            "--output", "r.json", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(workdir / "r.json")
    assert tok.special_tokens == {} and "\ufffd" in tok.decode(tok.encode("hello \ufffd"))


@pytest.mark.parametrize("command", ["encode", "show", "decode"])
def test_invalid_utf8_on_stdin_is_a_clear_error(workdir, command):
    r = subprocess.run([sys.executable, "-m", "tokenizer", command, "-t", "tok.json"], input=b"12 \xff 3",
                       capture_output=True, cwd=workdir, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == ("error: stdin: the bytes at offset 3 are not valid UTF-8 (invalid start "
                                         "byte); convert the text to UTF-8")


def test_utf8_on_stdin_is_read_as_utf8_whatever_the_locale(workdir):
    r = cli("encode", "-t", "tok.json", stdin="Köln 😀", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == Tokenizer.load(workdir / "tok.json").encode("Köln 😀")


def test_allowed_special_takes_one_token_and_leaves_the_text_alone(workdir):
    tok = Tokenizer.load(workdir / "tok.json")
    text = "hi<|endoftext|>"
    for command in ("encode", "show"):  # used to swallow the text as a second token, then wait on stdin
        r = cli_at_a_terminal(command, "-t", "tok.json", "--allowed-special", "<|endoftext|>", text, cwd=workdir)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1].split() == [str(i) for i in tok.encode(text, allowed_special="all")]
    r = cli("encode", "-t", "tok.json", "--ordinary", text, cwd=workdir)
    assert r.returncode == 0 and r.stdout.split() == [str(i) for i in tok.encode_ordinary(text)]
    r = cli("encode", "-t", "tok.json", "--ordinary", "--allowed-special", "all", text, cwd=workdir)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


@pytest.mark.parametrize("args", [["encode"], ["show"], ["decode"],
                                  ["encode", "--allowed-special", "<|pad|>"]])
def test_nothing_to_read_at_a_terminal_is_an_error_not_a_wait(workdir, args):
    r = cli_at_a_terminal(args[0], "-t", "tok.json", *args[1:], cwd=workdir)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stdin" in r.stderr or "special token" in r.stderr


def test_inputs_as_train_py_reads_them_folders_errors_and_home(workdir):
    corpus = workdir / "corpus"
    (corpus / "sub").mkdir(parents=True, exist_ok=True)
    (corpus / "one.txt").write_text("alpha beta gamma\n" * 30)
    (corpus / "sub" / "two.txt").write_bytes(b"delta \xff epsilon\n" * 30)
    (corpus / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped, as by train.py --data
    r = cli("train", "--input", "~/corpus", "--errors", "ignore", "--vocab-size", "1000", "--output",
            "~/folder.json", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(workdir / "folder.json")
    expected = Tokenizer.train(["alpha beta gamma\n" * 30, "delta  epsilon\n" * 30], vocab_size=1000,
                               progress=False)
    assert tok == expected
    assert f"learned {tok.vocab_size} ids, fewer than --vocab-size 1000: the corpus ran out of pairs" in r.stderr
    r = cli("encode", "-t", "~/folder.json", "--input", "~/corpus", "--errors", "replace", cwd=workdir)
    text = "".join(["alpha beta gamma\n" * 30, "delta \ufffd epsilon\n" * 30])
    assert r.returncode == 0 and r.stdout.split() == [str(i) for i in tok.encode(text)], r.stderr
    r = cli("info", "-t", "~/folder.json", "--file", "~/corpus", "--errors", "ignore", "--top", "0", cwd=workdir)
    assert r.returncode == 0 and "longest tokens (0):" in r.stdout and "compression" in r.stdout, r.stderr


def test_a_hugging_face_tokenizer_file_or_folder_is_read(workdir):
    """-t takes a Hugging Face tokenizer.json (here one trained by `tokenizers`, <|endoftext|> = 0), GPT-2's
    vocab.json + merges.txt or their folder, and gives the ids `tokenizers` gives."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as HFTokenizer

    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator([(workdir / "a.txt").read_text(encoding="utf-8")], vocab_size=400,
                           special_tokens=["<|endoftext|>"], show_progress=False)
    (workdir / "hf").mkdir(exist_ok=True)
    hf.save(str(workdir / "hf" / "tokenizer.json"))
    hf.save_model(str(workdir / "hf"))  # vocab.json + merges.txt
    text = "def f(x):\n    return 'Grüße' 😀<|endoftext|>"
    expected = HFTokenizer.from_file(str(workdir / "hf" / "tokenizer.json")).encode(text).ids
    for path in ("hf/tokenizer.json", "hf", "hf/vocab.json"):
        r = cli("encode", "-t", path, "--allowed-special", "all", text, cwd=workdir)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == expected
    r = cli("decode", "-t", "hf", *map(str, expected), cwd=workdir)
    assert r.returncode == 0 and r.stdout == text, r.stderr
