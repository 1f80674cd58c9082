"""Command line: ``python -m tokenizer train|encode|decode|info|show``.

    python -m tokenizer train --input corpus.txt --vocab-size 4096 --output tok.json
    python -m tokenizer encode -t tok.json "hello world"          # ids on one line
    python -m tokenizer decode -t tok.json 15339 1917              # text
    python -m tokenizer info -t tok.json --file corpus.txt         # sizes, longest tokens, compression
    python -m tokenizer show -t tok.json "hello world"             # how a text splits into tokens

User errors print one line (``error: ...``) and exit with status 2; nothing partial is written.
"""

from __future__ import annotations

import argparse
import sys
from itertools import chain
from pathlib import Path

from .errors import TokenizerError
from .patterns import pattern_from_name
from .textfiles import check_readable, decode_utf8, iter_file_text
from .tokenizer import EOT, Tokenizer


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
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    t.add_argument("--vocab-size", type=int, required=True, help="total ids: 256 bytes + merges + special tokens")
    t.add_argument("--pattern", default="gpt4", help="pre-splitting regex, or gpt2 / gpt4 (default gpt4)")
    t.add_argument("--special", nargs="*", default=[EOT], metavar="TOKEN",
                   help=f"special tokens (default {EOT}; give --special alone for none)")
    t.add_argument("--min-frequency", type=int, default=1, help="stop when no pair occurs this often")
    t.add_argument("--num-proc", type=int, default=None, help="processes for counting (default: all CPUs)")
    t.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: stop with an error (strict) or use U+FFFD (replace)")
    t.add_argument("--output", required=True, help="tokenizer JSON to write")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(run=_train)

    for name, fn, what in [("encode", _encode, "print the ids of a text"),
                           ("show", _show, "show how a text splits into tokens")]:
        e = sub.add_parser(name, help=what)
        _add_tokenizer(e)
        e.add_argument("text", nargs="?", help="text (default: --input FILE, or stdin)")
        e.add_argument("--input", metavar="FILE", help="read the text from this UTF-8 file")
        e.add_argument("--allowed-special", nargs="*", default=None, metavar="TOKEN",
                       help="encode these special tokens (none given: all of them) instead of refusing them")
        e.set_defaults(run=fn)

    d = sub.add_parser("decode", help="print the text of ids")
    _add_tokenizer(d)
    d.add_argument("ids", nargs="*", help="token ids (default: read them from stdin)")
    d.set_defaults(run=_decode)

    i = sub.add_parser("info", help="vocabulary size, pattern, longest tokens, compression on a file")
    _add_tokenizer(i)
    i.add_argument("--file", help="report bytes per token on this UTF-8 file")
    i.add_argument("--top", type=int, default=10, help="how many of the longest tokens to list")
    i.set_defaults(run=_info)
    return p


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tokenizer", required=True, help="tokenizer JSON written by `train`")


def _train(args: argparse.Namespace) -> None:
    files = [check_readable(f) for f in args.input]
    out = Path(args.output)
    if out.is_dir():
        raise TokenizerError(f"--output {out} is a directory; give a file name such as {out}/tok.json")
    if not out.parent.exists():
        raise TokenizerError(f"--output folder {out.parent} does not exist; create it first")
    texts = chain.from_iterable(iter_file_text(f, errors=args.errors) for f in files)
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size, pattern=pattern_from_name(args.pattern),
                          special_tokens=args.special, min_frequency=args.min_frequency,
                          progress=not args.quiet, num_proc=args.num_proc)
    tok.save(out)
    print(f"wrote {out}: vocab_size {tok.vocab_size}, checksum {tok.checksum[:12]}", file=sys.stderr)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None and args.input:
        raise TokenizerError("give either a text argument or --input FILE, not both")
    if args.text is not None:
        return args.text
    if args.input:
        return "".join(iter_file_text(args.input))
    return _read_stdin()


def _read_stdin() -> str:
    return decode_utf8(sys.stdin.buffer.read(), "stdin")


def _allowed(args: argparse.Namespace):
    if args.allowed_special is None:
        return "none"
    return set(args.allowed_special) or "all"


def _encode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(_read_text(args), allowed_special=_allowed(args))
    print(" ".join(map(str, ids)))


def _decode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
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
    ids = tok.encode(_read_text(args), allowed_special=_allowed(args))
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
    tok = Tokenizer.load(args.tokenizer)
    print(f"vocab_size     {tok.vocab_size}")
    print(f"special_tokens {tok.special_tokens}")
    print(f"pattern        {tok.pattern}")
    print(f"checksum       {tok.checksum}")
    longest = sorted(tok.token_ids.items(), key=lambda kv: (-len(kv[0]), kv[1]))[:args.top]
    print(f"longest tokens ({len(longest)}):")
    for raw, i in longest:
        print(f"  {i:>7}  {len(raw):>3} bytes  [{_visible(raw)}]")
    if args.file:
        n_bytes = n_tokens = 0
        for text in iter_file_text(args.file):
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tok.encode_ordinary(text))
        ratio = n_bytes / n_tokens if n_tokens else 0.0
        print(f"compression    {args.file}: {n_bytes} bytes -> {n_tokens} tokens = {ratio:.3f} bytes/token")


if __name__ == "__main__":
    sys.exit(main())
