"""BPE trainer: the textbook example, a slow obviously-correct reference, determinism, streaming, bad input."""
import random
import time
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, TokenizerError
from tokenizer.patterns import splitter
from tokenizer.piece_table import PAIR, PieceTable
from tokenizer.trainer import count_pieces, learn_merges, train_bpe


def reference_train(words: dict, vocab: list, vocab_size: int, min_frequency: int = 1) -> list:
    """Recount every pair of the whole corpus before each merge; pick the highest count, ties: smallest pair."""
    vocab = list(vocab)
    corpus = [(list(w), c) for w, c in words.items()]
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for symbols, c in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_frequency:
            break
        content = vocab[best[0]] + vocab[best[1]]
        if content not in vocab:
            vocab.append(content)
        merged = vocab.index(content)
        merges.append((best[0], best[1], merged))
        new_corpus = []
        for symbols, c in corpus:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_corpus.append((out, c))
        corpus = new_corpus
    return merges, vocab


def char_words(counts: dict[str, int]) -> tuple[dict, list]:
    """Words with characters as symbols (the textbook setting): symbol ids in sorted character order."""
    alphabet = sorted(set("".join(counts)))
    ids = {ch: i for i, ch in enumerate(alphabet)}
    return {tuple(ids[ch] for ch in w): c for w, c in counts.items()}, alphabet


def test_worked_example_pair_counts_and_first_merges():
    words, vocab = char_words({"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5})
    table = PieceTable([s for w in words for s in w], [len(w) for w in words], list(words.values()))
    pair_counts = table.index_pairs()
    named = {vocab[k // PAIR] + vocab[k % PAIR]: c for k, c in pair_counts.items()}
    assert named == {"ug": 20, "pu": 17, "un": 16, "hu": 15, "gs": 5, "bu": 4}
    merges = learn_merges(words, vocab, len(vocab) + 3)
    assert [vocab[m] for _, _, m in merges] == ["ug", "un", "hug"]


@pytest.mark.parametrize("seed", range(12))
def test_fast_trainer_equals_reference_including_ties(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 3 == 0 else "abc d"  # tiny alphabets: many ties and repeated contents
    counts = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))): rng.randint(1, 4) for _ in range(40)}
    words, vocab = char_words(counts)
    target = len(vocab) + 30
    expected, expected_vocab = reference_train(words, vocab, target)
    got_vocab = list(vocab)
    assert learn_merges(words, got_vocab, target) == expected
    assert got_vocab == expected_vocab


def test_byte_level_training_equals_reference_with_min_frequency():
    text = "the cat sat on the mat; the hat is flat. " * 5 + "ünïcödé 😀😀 12345 " * 3
    words = {tuple(p.encode()): c for p, c in count_pieces(text, GPT4_PATTERN, num_proc=1).items()}
    base = [bytes([b]) for b in range(256)]
    expected_merges, expected_vocab = reference_train(words, base, 400, min_frequency=3)
    vocab = train_bpe(text, 400, GPT4_PATTERN, min_frequency=3, num_proc=1)
    assert vocab == expected_vocab
    assert len(vocab) < 400  # stopped by min_frequency, not by size
    tok = Tokenizer.train(text, vocab_size=400, min_frequency=3, progress=False)
    assert tok.vocab_size == len(expected_vocab) + 1 and tok.eot_id == len(expected_vocab)


def test_training_is_deterministic_and_streaming_matches_one_string():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "x1", "(y)", "  z", "w  ", "q.", "\t", "\r", "é"]
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
                      for _ in range(30)) + "\n" for _ in range(20)]
    a = Tokenizer.train(docs, vocab_size=320, progress=False, num_proc=1)
    b = Tokenizer.train(iter(docs), vocab_size=320, progress=False, num_proc=1)
    assert a.checksum == b.checksum
    # Counting a long text chunk by chunk (cut at safe points) gives the pieces of the whole.
    whole = "".join(docs)
    from tokenizer import trainer
    chunks = list(trainer.iter_text_chunks(whole, 100))
    assert len(chunks) > 10 and "".join(chunks) == whole
    assert_chunks_count_like_the_whole(chunks, whole)


def assert_chunks_count_like_the_whole(chunks: list[str], whole: str) -> None:
    """Counting chunk by chunk gives exactly the pieces of the whole, with both built-in patterns."""
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        per_chunk = Counter()
        for chunk in chunks:
            per_chunk.update(count_pieces(chunk, pattern, num_proc=1))
        assert per_chunk == count_pieces(whole, pattern, num_proc=1)


def test_file_streaming_gives_the_pieces_of_the_whole_file(tmp_path):
    from tokenizer.textfiles import iter_file_text
    rng = random.Random(2)
    text = "".join(rng.choice(["word", " ", "  ", "\n", "\r\n", "é", "😀", ".", "12"]) for _ in range(20_000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    chunks = list(iter_file_text(path, block_bytes=500))
    assert len(chunks) > 20 and "".join(chunks) == text
    assert_chunks_count_like_the_whole(chunks, text)


@pytest.mark.parametrize("procs, hand_over_at", [(2, None), (3, None), (2, 50)])
def test_counting_in_several_processes_equals_one(monkeypatch, procs, hand_over_at):
    # Each process keeps its counts and hands them over at the end, or whenever they pass their limit (here, with
    # hand_over_at, after nearly every batch): none may be lost or counted twice.
    from tokenizer import trainer
    monkeypatch.setattr(trainer, "BATCH_CHARS", 2000)
    if hand_over_at:
        monkeypatch.setattr(trainer, "HAND_OVER_PIECES", hand_over_at)
        monkeypatch.setattr(trainer, "MIN_HAND_OVER_PIECES", hand_over_at)
    rng = random.Random(1)
    docs = ["".join(rng.choice("abc \n1.é") for _ in range(3000)) for _ in range(8)]
    assert count_pieces(docs, GPT4_PATTERN, num_proc=procs) == count_pieces(docs, GPT4_PATTERN, num_proc=1)


def test_a_counting_process_hands_its_counts_over_past_its_limit(monkeypatch):
    # its memory stays bounded: past `limit` distinct pieces its counts go back with the batch's result
    from collections import Counter

    from tokenizer import trainer
    monkeypatch.setattr(trainer, "_worker_counts", Counter())
    assert trainer._count_in_worker((GPT4_PATTERN, ["a b a", "c"], 4)) == (6, None)  # 4 pieces: "a", " b", " a", "c"
    assert trainer._count_in_worker((GPT4_PATTERN, [" d"], 4)) == (2, Counter({"a": 1, " b": 1, " a": 1, "c": 1,
                                                                                " d": 1}))
    assert trainer._worker_counts == Counter()  # a fresh start
    assert trainer._count_in_worker((GPT4_PATTERN, ["e"], 4)) == (1, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=256), "too small"),
    (dict(vocab_size=300, special_tokens=["<a>", "<a>"]), "distinct"),
    (dict(vocab_size=300, min_frequency=0), "min_frequency"),
    (dict(vocab_size=300, pattern="(unclosed"), "invalid split pattern"),
    (dict(vocab_size=300, pattern=r"\w*"), "empty string"),
    (dict(vocab_size=300, num_proc=0), "num_proc must be a positive integer"),  # was taken as "every CPU"
    (dict(vocab_size=300, num_proc=-1), "num_proc must be a positive integer"),
    (dict(vocab_size=300, num_proc="2"), "num_proc must be a positive integer"),
])
def test_bad_training_arguments(kwargs, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.train("some text", progress=False, **kwargs)


def test_empty_corpus_is_an_error():
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train(["", ""], vocab_size=300, progress=False)
    with pytest.raises(TokenizerError, match="must be str"):
        Tokenizer.train([b"bytes"], vocab_size=300, progress=False)


def test_pattern_with_capturing_group_is_refused():
    with pytest.raises(TokenizerError, match=r"\(\?:\.\.\.\)"):
        Tokenizer.train("hello world", vocab_size=300, pattern=r" ?(\w+)|\s", progress=False, num_proc=1)
    Tokenizer.train("hello world", vocab_size=300, pattern=r" ?(?:\w+)|\s|.", progress=False, num_proc=1)


def test_pattern_that_skips_text_is_refused():
    with pytest.raises(TokenizerError, match="does not cover all of the text"):
        Tokenizer.train("hello, world!", vocab_size=300, pattern=r" ?\w+", progress=False, num_proc=1)


def test_one_special_token_given_as_a_string():
    tok = Tokenizer.train("hello world", vocab_size=300, special_tokens="<|x|>", progress=False, num_proc=1)
    assert list(tok.special_tokens) == ["<|x|>"]


def test_long_pieces_equal_reference_including_ties():
    rng = random.Random(7)
    counts = {"a" * 301: 1, "ab" * 150: 2, "aab" * 70 + "b": 1, "".join(rng.choice("ab") for _ in range(400)): 1}
    words, vocab = char_words(counts)
    target = len(vocab) + 40
    expected, expected_vocab = reference_train(words, vocab, target)
    got_vocab = list(vocab)
    assert learn_merges(words, got_vocab, target) == expected
    assert got_vocab == expected_vocab


def table_pieces(table: PieceTable) -> list[list[int]]:
    """The table's pieces as symbol lists, read by following the links from each sentinel."""
    pieces, sym, nxt = [], table.sym.tolist(), table.nxt.tolist()
    for edge in [i for i, s in enumerate(sym) if s == -1][:-1]:
        piece, k = [], nxt[edge]
        while sym[k] >= 0:
            piece.append(sym[k])
            k = nxt[k]
        pieces.append(piece)
    return pieces


def recount(pieces: list[list[int]], counts: list[int]) -> Counter:
    pairs = Counter()
    for symbols, c in zip(pieces, counts):
        for left, right in zip(symbols, symbols[1:]):
            pairs[left * PAIR + right] += c
    return +pairs


@pytest.mark.parametrize("seed", range(6))
def test_piece_table_merges_like_the_textbook_and_reports_exact_count_changes(seed):
    """After every merge the table holds exactly the reference's rewritten pieces, and the reported deltas keep
    every pair count exact: runs of one symbol (odd and even lengths) and adjacent joins ("abab") included."""
    rng = random.Random(seed)
    words = {tuple(rng.choice((0, 0, 1, 2)) for _ in range(rng.randint(1, 30))): rng.randint(1, 5) for _ in range(60)}
    words[(0,) * 7] = 3
    words[(0, 1) * 6] = 2
    corpus = [list(w) for w in words]
    counts = list(words.values())
    table = PieceTable([s for w in corpus for s in w], [len(w) for w in corpus], counts)
    pair_counts = Counter(table.index_pairs())
    assert +pair_counts == recount(corpus, counts)
    next_id = 3
    for _ in range(25):
        best = min(pair_counts, key=lambda k: (-pair_counts[k], k)) if +pair_counts else None
        if best is None:
            break
        a, b = divmod(best, PAIR)
        gained, lost = table.merge(a, b, next_id)
        for key, amount in gained:
            pair_counts[key] += amount
        for key, amount in lost:
            pair_counts[key] -= amount
        del pair_counts[best]
        corpus = [merge_reference(symbols, a, b, next_id) for symbols in corpus]
        assert table_pieces(table) == corpus
        assert +pair_counts == recount(corpus, counts)
        next_id += 1


def merge_reference(symbols: list[int], a: int, b: int, merged: int) -> list[int]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def test_byte_level_training_on_many_distinct_pieces_equals_reference():
    rng = random.Random(3)
    syllables = ["th", "e", "in", "er", "an", " ", "é", "😀", "x", "q", "re", "on"]
    pieces = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 6))) for _ in range(1500)}
    words = {tuple(p.encode()): 1 + int(1000 / (1 + rank)) for rank, p in enumerate(sorted(pieces))}
    base = [bytes([b]) for b in range(256)]
    expected_merges, expected_vocab = reference_train(words, base, 256 + 120)
    vocab = list(base)
    assert learn_merges(words, vocab, 256 + 120) == expected_merges
    assert vocab == expected_vocab


@pytest.mark.parametrize("unit", ["a", "ab"])
def test_a_long_piece_trains_in_about_linear_time(unit):
    # Rewriting a piece in place cost O(n) per join, O(n^2) per merge: 4x the length took about 16x the time
    # (1.0 s at 100 000 symbols, 13 s at 400 000). Merging all joins at once in the piece table makes it about 4x,
    # for runs of one symbol ("aaaa": every other pair joins) and adjacent joins ("abab") alike. A ratio, not a
    # time, so that the test means the same on a slow or busy machine.
    def seconds(n: int) -> float:
        words = {tuple(unit.encode()) * (n // len(unit)): 1}
        vocab = [bytes([b]) for b in range(256)]
        start = time.perf_counter()
        merges = learn_merges(words, vocab, 300)
        assert [vocab[m] for _, _, m in merges[:2]] == {"a": [b"aa", b"aaaa"], "ab": [b"ab", b"abab"]}[unit]
        return time.perf_counter() - start

    short = min(seconds(200_000) for _ in range(3))
    ratio = min(seconds(800_000) for _ in range(2)) / short
    assert ratio < 8, f"4x the length took {ratio:.1f}x the time (linear: about 4x, quadratic: about 16x)"


# Fragments where the two engines or the safe cuts could disagree: every ASCII space and control character
# (\x1c-\x1f are spaces to `re` but not to `regex`), contractions in both cases, digit runs, a final newline, and
# non-ASCII letters, digits and spaces (long s folds to "s", NBSP and NEL are spaces, "²" a number).
FRAGMENTS = ["a", "Zq", "x", "'s", "'S", "'ll", "'LL", "'Ve", "'re", "'", "12", "12345", ".", "!?", "(", "_",
             " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f",
             "é", "ſ", "'ſ", "²", "\u00a0", "\u0085", "\u2028", "😀", "日本"]


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_the_ascii_classes_are_the_ones_regex_uses(pattern):
    ascii_chars = [chr(c) for c in range(128)]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for cls, expected in [(r"\s", "\t\n\x0b\x0c\r "), (r"\p{L}", letters), (r"\p{N}", "0123456789")]:
        assert "".join(c for c in ascii_chars if regex.fullmatch(cls, c)) == expected
    split = splitter(pattern)
    for c in ascii_chars:  # one character, and each character between words, at the end, doubled
        for text in (c, f"ab{c}cd", f"ab {c} 1{c}", f"x{c}\n", c * 2 + "y"):
            assert split(text) == regex.findall(pattern, text), repr(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_the_splitter_gives_the_patterns_pieces(text):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert splitter(pattern)(text) == regex.findall(pattern, text)
        ascii_only = text.encode("ascii", "ignore").decode()
        assert splitter(pattern)(ascii_only) == regex.findall(pattern, ascii_only)
        # after enough ASCII lines the text is mostly ASCII (patterns.MOSTLY_ASCII): it is cut at safe points
        mostly_ascii = "ab cd\nxy\n" * 1500 + text
        assert splitter(pattern)(mostly_ascii) == regex.findall(pattern, mostly_ascii)
