"""The pre-split of the encoder and the trainer (`tokenizer.patterns.splitter`) against one `regex.findall`, on
text of every kind: its `re` path is a win on ASCII and must not be a loss elsewhere.

    python bench/bench_split.py

Texts (built from what every Python has, so the numbers can be compared between machines): the standard
library's code; English prose (pydoc's topics, the documentation's text); the same prose with 30 % of its lines'
apostrophes curly (as web text has them); Russian-like and Chinese-like text (random words of the alphabet, random
CJK characters); and documents that are half prose, half Russian-like. Each is cut into documents of about 2 KB,
as a corpus is read. Both functions must give the same pieces (checked); the table gives the time of ours over
`regex`'s, best of interleaved trials.
"""
from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, compile_pattern, fast_equivalent, splitter  # noqa: E402


def texts(seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("[a-e]*.py")))
    prose = (lib / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    curly = "".join(line.replace("'", "\u2019") if rng.random() < 0.3 else line for line in prose.splitlines(True))

    def words(alphabet: str, lines: int) -> str:
        return "".join(" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))
                                for _ in range(rng.randint(3, 14))) + rng.choice(".,!") + "\n" for _ in range(lines))

    russian = words("абвгдежзийклмнопрстуфхцчшщыэюя", 20_000)
    chinese = "".join("".join(chr(rng.randint(0x4E00, 0x4E00 + 3000)) for _ in range(rng.randint(8, 40))) + "\u3002\n"
                      for _ in range(20_000))
    mixed = "".join(a + b for a, b in zip(documents(prose), documents(russian)))
    return {"stdlib code": code, "English prose": prose, "prose, curly apostrophes": curly,
            "Russian-like": russian, "Chinese-like": chinese, "half prose, half Russian-like": mixed}


def documents(text: str, size: int = 2000) -> list[str]:
    """The text in documents of about `size` characters, cut at line ends."""
    docs, current, length = [], [], 0
    for line in text.splitlines(True):
        current.append(line)
        length += len(line)
        if length >= size:
            docs.append("".join(current))
            current, length = [], 0
    return docs + (["".join(current)] if current else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    print(f"Python {sys.version.split()[0]}; time of patterns.splitter / one regex.findall per document, best of "
          f"{args.trials} interleaved trials (below 1: ours is faster)\n")
    print("| text | MB | gpt2 pattern | gpt4 pattern |\n|---|---|---|---|")
    for name, text in texts().items():
        docs = documents(text)
        ratios = []
        for pattern in (GPT2_PATTERN, GPT4_PATTERN):
            ours, theirs = splitter(pattern), compile_pattern(fast_equivalent(pattern)).findall
            assert [ours(d) for d in docs] == [theirs(d) for d in docs], name
            best = {ours: float("inf"), theirs: float("inf")}
            for _ in range(args.trials):
                for split in best:
                    started = time.perf_counter()
                    for d in docs:
                        split(d)
                    best[split] = min(best[split], time.perf_counter() - started)
            ratios.append(best[ours] / best[theirs])
        print(f"| {name} | {len(text.encode()) / 1e6:.1f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")


if __name__ == "__main__":
    main()
