"""CLI smoke tests: `python -m tokenizer ...` works end to end and bad input gives one line, exit 2, no file."""
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenizer", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


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
    show = cli("show", "-t", "tok.json", "Köln <|endoftext|>", "--allowed-special", cwd=workdir)
    assert show.returncode == 0 and "[<|endoftext|>]" in show.stdout and show.stdout.startswith("[")
    info = cli("info", "-t", "tok.json", "--file", "b.txt", cwd=workdir)
    assert info.returncode == 0 and "vocab_size     500" in info.stdout and "bytes/token" in info.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--input", "missing.txt", "--vocab-size", "300", "--output", "o.json"], "does not exist"),
    (["train", "--input", ".", "--vocab-size", "300", "--output", "o.json"], "is a directory"),
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
])
def test_bad_input_is_one_line_exit_2_and_no_output(workdir, args, message):
    (workdir / "bad.txt").write_bytes(b"hello \xff\xfe world")
    (workdir / "empty.txt").write_bytes(b"")
    r = cli(*args, cwd=workdir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (workdir / "o.json").exists()


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
