"""Command line: ``python -m tokenizer train|encode|decode|info|show``.

    python -m tokenizer train --input corpus.txt books/ --vocab-size 4096 --output tok.json
    python -m tokenizer encode -t tok.json "hello world"          # ids on one line
    python -m tokenizer encode -t tok.json --allowed-special all "hi<|endoftext|>"   # special tokens as ids
    python -m tokenizer decode -t tok.json 15339 1917              # text
    python -m tokenizer info -t tok.json --file corpus.txt         # sizes, longest tokens, compression
    python -m tokenizer show -t tok.json "hello world"             # how a text splits into tokens
    python -m tokenizer encode -t gpt2/tokenizer.json "hi"         # a Hugging Face file or folder works too
    python -m tokenizer encode -t gpt2/vocab.json "hi"             # so does GPT-2's vocab.json + merges.txt

User errors print one line (``error: ...``) and exit with status 2; nothing partial is written.
"""

from __future__ import annotations

import argparse
import sys
from itertools import chain
from pathlib import Path

from .errors import TokenizerError
from .patterns import pattern_from_name
from .textfiles import decode_utf8, input_files, iter_file_text
from .tokenizer import EOT, Tokenizer

ERROR_MODES = ("strict", "replace", "ignore")  # as data/sources.py (train.py --errors)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `... | head`: the reader left, nothing is wrong
        return 0
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenizer", description="Byte-level BPE tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="learn a vocabulary from text files")
    t.add_argument("--input", nargs="+", required=True, type=_path, metavar="PATH",
                   help="UTF-8 text files, folders (every text file below them) or quoted globs, as train.py --data")
    t.add_argument("--vocab-size", type=int, required=True, help="total ids: 256 bytes + merges + special tokens")
    t.add_argument("--pattern", default="gpt4", help="pre-splitting regex, or gpt2 / gpt4 (default gpt4)")
    t.add_argument("--special", nargs="*", default=[EOT], metavar="TOKEN",
                   help=f"special tokens (default {EOT}; give --special alone for none)")
    t.add_argument("--min-frequency", type=int, default=1, help="stop when no pair occurs this often")
    t.add_argument("--num-proc", type=int, default=None, help="processes for counting (default: all CPUs)")
    _add_errors(t)
    t.add_argument("--output", required=True, type=_path, help="tokenizer JSON to write")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(run=_train)

    for name, fn, what in [("encode", _encode, "print the ids of a text"),
                           ("show", _show, "show how a text splits into tokens")]:
        e = sub.add_parser(name, help=what)
        _add_tokenizer(e)
        e.add_argument("text", nargs="?", help="text (default: --input PATH, or stdin)")
        e.add_argument("--input", type=_path, metavar="PATH", help="read the text from this UTF-8 file or folder")
        _add_errors(e)
        special = e.add_mutually_exclusive_group()
        special.add_argument("--allowed-special", action="append", metavar="TOKEN",
                             help="encode this special token as its id instead of refusing it (repeat the flag "
                                  "for several; 'all' for every one)")
        special.add_argument("--ordinary", action="store_true",
                             help="encode special-token text such as <|endoftext|> as plain text")
        e.set_defaults(run=fn)

    d = sub.add_parser("decode", help="print the text of ids")
    _add_tokenizer(d)
    d.add_argument("ids", nargs="*", help="token ids (default: read them from stdin)")
    d.set_defaults(run=_decode)

    i = sub.add_parser("info", help="vocabulary size, pattern, longest tokens, compression on a file")
    _add_tokenizer(i)
    i.add_argument("--file", type=_path, metavar="PATH", help="report bytes per token on this UTF-8 file or folder")
    _add_errors(i)
    i.add_argument("--top", type=int, default=10, help="how many of the longest tokens to list (0 for none)")
    i.set_defaults(run=_info)
    return p


def _path(text: str) -> Path:
    """A path argument, with ~ expanded as a shell would (a quoted ~ reaches us as it is)."""
    return Path(text).expanduser()


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tokenizer", required=True, type=_path,
                   help="tokenizer JSON written by `train`, a Hugging Face tokenizer.json or vocab.json (with "
                        "merges.txt beside it), or a folder holding one (a minigpt checkpoint, a Hugging Face model)")


def _add_errors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--errors", choices=ERROR_MODES, default="strict",
                   help="invalid UTF-8 in files: stop with an error (strict), read it as U+FFFD (replace) or drop "
                        "it (ignore)")


def _files(paths: list[Path]) -> list[Path]:
    """The text files of the paths (folders and globs expanded), checked before any work starts."""
    files = [f for path in paths for f in input_files(path)]
    for f in files:
        if f.suffix in (".jsonl", ".parquet"):  # their text is a field of each row: data/sources.py reads it
            raise TokenizerError(
                f"{f} is a {f.suffix} file; this command reads plain text, not the text field of its rows: extract "
                f"the text to a file first, or train the tokenizer with data.prepare.prepare_data({str(f)!r}, "
                f"vocab_size=...), which reads the field (text_field=...) and writes tokenizer.json beside the tokens")
    return files


def _file_text(files: list[Path], errors: str):
    return chain.from_iterable(iter_file_text(f, errors=errors) for f in files)


def _train(args: argparse.Namespace) -> None:
    files = _files(args.input)
    out = args.output
    if out.is_dir():
        raise TokenizerError(f"--output {out} is a directory; give a file name such as {out}/tok.json")
    if not out.parent.exists():
        raise TokenizerError(f"--output folder {out.parent} does not exist; create it first")
    if out.exists() and any(out.samefile(f) for f in files):
        raise TokenizerError(f"--output {out} is one of the --input files: writing the tokenizer there would replace "
                             f"the text it is trained on; give another file name (or move it out of the input folder)")
    tok = Tokenizer.train(_file_text(files, args.errors), vocab_size=args.vocab_size,
                          pattern=pattern_from_name(args.pattern), special_tokens=args.special,
                          min_frequency=args.min_frequency, progress=not args.quiet, num_proc=args.num_proc)
    tok.save(out)
    print(f"wrote {out}: vocab_size {tok.vocab_size}, checksum {tok.checksum[:12]}", file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        why = ("no pair of tokens is left to merge" if args.min_frequency == 1 else
               f"no pair occurs --min-frequency {args.min_frequency} times any more")
        print(f"note: learned {tok.vocab_size} ids, fewer than --vocab-size {args.vocab_size}: the corpus ran out "
              f"of pairs ({why}); give more text for a larger vocabulary", file=sys.stderr)


def _text_source(args: argparse.Namespace):
    """A function that reads the text to encode, once every argument has been checked: reading stdin waits for
    input, so a mistake must not leave the command hanging there."""
    if args.text is not None and args.input:
        raise TokenizerError("give either a text argument or --input PATH, not both")
    if args.text is not None:
        return lambda: args.text
    if args.input:
        files = _files([args.input])
        return lambda: "".join(_file_text(files, args.errors))
    if sys.stdin.isatty():
        raise TokenizerError(f"no text to {args.command}: give it as an argument, with --input PATH, or on stdin "
                             f"(e.g. echo hi | python -m tokenizer {args.command} -t TOKENIZER)")
    return _read_stdin


def _read_stdin() -> str:
    return decode_utf8(sys.stdin.buffer.read(), "stdin")


def _encoder(args: argparse.Namespace, tok: Tokenizer):
    """The encode function the flags ask for, with --allowed-special checked against the tokenizer."""
    if args.ordinary:
        return tok.encode_ordinary
    allowed = args.allowed_special or []
    if "all" in allowed and "all" not in tok.special_tokens:
        allowed = "all"
    else:
        unknown = sorted(set(allowed) - tok.special_tokens.keys())
        if unknown:
            raise TokenizerError(f"--allowed-special {unknown[0]!r} is not a special token of {args.tokenizer} "
                                 f"(it has {', '.join(tok.special_tokens) or 'none'}); name one of them, or 'all'")
        allowed = set(allowed) or "none"
    return lambda text: tok.encode(text, allowed_special=allowed)


def _encode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    encode, read = _encoder(args, tok), _text_source(args)
    print(" ".join(map(str, encode(read()))))


def _decode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    if not args.ids and sys.stdin.isatty():
        raise TokenizerError("no ids to decode: give them as arguments or on stdin "
                             "(e.g. ... encode ... | python -m tokenizer decode -t TOKENIZER)")
    words = args.ids or _read_stdin().split()
    ids = [_token_id(w) for w in words]
    sys.stdout.write(tok.decode(ids))
    sys.stdout.flush()


def _token_id(word: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise TokenizerError(f"{word!r} is not a token id; pass integers separated by spaces") from None


def _show(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    encode, read = _encoder(args, tok), _text_source(args)
    ids = encode(read())
    print("".join(f"[{_visible(tok.token_bytes(i))}]" for i in ids))
    print(" ".join(map(str, ids)))
    print(f"{len(ids)} tokens", file=sys.stderr)


def _visible(raw: bytes) -> str:
    """A token as readable text: escapes for whitespace and control characters, <0xNN> for partial UTF-8."""
    out = []
    text = raw.decode("utf-8", errors="surrogateescape")
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"<0x{ord(ch) - 0xDC00:02X}>")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def _info(args: argparse.Namespace) -> None:
    if args.top < 0:
        raise TokenizerError(f"--top must be 0 or more, got {args.top}")
    tok = Tokenizer.load(args.tokenizer)
    compression = None
    if args.file:  # measured first, so that a bad file stops the command before it prints anything
        n_bytes = n_tokens = 0
        for text in _file_text(_files([args.file]), args.errors):
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tok.encode_ordinary(text))
        ratio = n_bytes / n_tokens if n_tokens else 0.0
        compression = f"{args.file}: {n_bytes} bytes -> {n_tokens} tokens = {ratio:.3f} bytes/token"
    print(f"vocab_size     {tok.vocab_size}")
    print(f"special_tokens {tok.special_tokens}")
    print(f"pattern        {tok.pattern}")
    print(f"checksum       {tok.checksum}")
    longest = sorted(tok.token_ids.items(), key=lambda kv: (-len(kv[0]), kv[1]))[:args.top]
    print(f"longest tokens ({len(longest)}):")
    for raw, i in longest:
        print(f"  {i:>7}  {len(raw):>3} bytes  [{_visible(raw)}]")
    if compression:
        print(f"compression    {compression}")


if __name__ == "__main__":
    sys.exit(main())
