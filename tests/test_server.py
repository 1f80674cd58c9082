"""`python -m minigpt.serve` end to end: a real server process on a free port of 127.0.0.1, driven by the official
`openai` client, raw HTTP and a headless browser. Its guarantees: greedy text equals sample.py's, a seeded request
gives the same text alone or among concurrent ones, a stream concatenates to the whole answer; every bad request
gets OpenAI's error shape with a 4xx status."""
from __future__ import annotations

import contextlib
import http.client
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import openai
import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.checkpoint import load_model, save_checkpoint
from minigpt.generate import choose_next
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("the cat sees a dog. naïve café, 日本語のテキスト, emoji 🙂🎉 and Ελληνικά.\n"
        "def f(x):\n    return x * 2\n") * 8
BLOCK = 64
PROMPT = "the cat sees"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random model with an untied head (its greedy text varies) and a byte-level tokenizer with
    <|endoftext|>, saved as train.py saves one; the folder's name is the model id. Its head is scaled up so that
    its logits spread as a trained model's do, rather than GPT-2 initialisation's near-uniform ones."""
    tok = Tokenizer.train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                          tie_weights=False, positions="learned"))
    with torch.no_grad():
        model.head.weight *= 20
    folder = tmp_path_factory.mktemp("serve") / "tiny-model"
    save_checkpoint(folder, model, tok, {"model": model.config.to_dict(), "train": {}, "step": 0})
    return folder


def start_server(folder: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """The CLI in a process of its own; the address comes from the line it prints."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.serve", str(folder), "--port", "0", "--threads", "1",
                             *flags], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc, url = start_server(checkpoint, log, "--max-batch", "4", "--max-queue", "6", "--max-tokens", "100000")
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()  # no request printed one


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


class Answer:
    """A raw HTTP answer (the standard library's client: no client library between the test and the server)."""

    def __init__(self, status: int, headers: dict, text: str) -> None:
        self.status_code, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)


def request(server: str, method: str, path: str, body=None) -> Answer:
    conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    try:
        content = body if body is None or isinstance(body, str) else json.dumps(body)
        conn.request(method, path, body=content, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read().decode("utf-8"))
    finally:
        conn.close()


def post(server: str, path: str, body) -> Answer:
    return request(server, "POST", path, body)


def get(server: str, path: str) -> Answer:
    return request(server, "GET", path)


class Stream:
    """A streaming completion read line by line; `close` leaves mid-stream, as a client that goes away."""

    def __init__(self, server: str, body: dict) -> None:
        self.conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
        self.conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                          headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def first_line(self) -> str:
        return self.response.readline().decode("utf-8")

    def rest(self) -> str:
        return self.response.read().decode("utf-8")

    def close(self) -> None:
        self.conn.sock.close()
        self.conn.close()


def sample_cli(folder: Path, *args: str) -> dict:
    """sample.py's entry point, run in this process (a fresh interpreter would cost seconds of imports)."""
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["sample.py", "--out-dir", str(folder), "--json", *args]), \
            contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.run_cli(cli.main)
    assert exit_.value.code in (0, None)
    return json.loads(out.getvalue())


# ------------------------------------------------------------------------------------------- the guarantees
def test_greedy_text_equals_sample_py_at_temperature_0(server, client, checkpoint):
    expected = sample_cli(checkpoint, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "40")["samples"][0]
    answer = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=40, temperature=0)
    assert answer.choices[0].text == expected["text"]
    assert answer.usage.completion_tokens == expected["tokens"]
    assert answer.choices[0].finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")
    # The premise: no step of this greedy text is a near-tie that batch arithmetic (~2e-6) could flip.
    model, tok, _ = load_model(checkpoint)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        for _ in range(expected["tokens"]):
            top2 = model(torch.tensor([ids[-BLOCK:]]))[0][0, -1, :tok.vocab_size].topk(2).values
            assert float(top2[0] - top2[1]) > 1e-4
            ids.append(int(model(torch.tensor([ids[-BLOCK:]]))[0][0, -1, :tok.vocab_size].argmax()))


def test_a_seeded_request_gives_the_same_text_alone_or_among_concurrent_ones(server, client):
    def ask(seed, prompt=PROMPT, **kw):
        return client.completions.create(model="tiny-model", prompt=prompt, max_tokens=30, temperature=1.0,
                                         seed=seed, **kw).choices[0].text

    alone = ask(7)
    assert ask(7) == alone and ask(8) != alone
    others = [dict(seed=7, prompt="def f(x):"), dict(seed=None, prompt=PROMPT), dict(seed=3, prompt="日本語",
              top_p=0.9), dict(seed=None, prompt="a", extra_body={"top_k": 5}), dict(seed=11, prompt="x" * 40)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, **kw) for kw in others[:3]]
        together = [pool.submit(ask, 7) for _ in range(2)]  # the batch holds 4: some of these wait for a row
        futures += [pool.submit(ask, **kw) for kw in others[3:]]
        assert [f.result() for f in together] == [alone, alone]
        [f.result() for f in futures]


def test_top_k_1_at_temperature_1_is_greedy(client):
    def ask(**kw):
        return client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=40, seed=3, **kw).choices[0].text

    greedy = ask(temperature=0)
    assert ask(temperature=1.0) != greedy  # the premise: this seed's draw at temperature 1 is not the greedy text
    assert ask(temperature=1.0, extra_body={"top_k": 1}) == greedy


def reference_draw(model, tok, seed: int, new: int, top_k: int | None, top_p: float | None) -> str:
    """The text that generate.choose_next draws at temperature 1 from full forward passes, with a generator seeded
    with `seed`, up to the end-of-text token."""
    generator, ids, out = torch.Generator().manual_seed(seed), tok.encode(PROMPT), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids[-BLOCK:]]))[0][:, -1, :tok.vocab_size]
            token = int(choose_next(logits, 1.0, top_k, top_p, generator)[0])
            if token == tok.eot_id:
                break
            out.append(token)
            ids.append(token)
    return tok.decode(out)


@pytest.mark.parametrize("top_k, top_p", [(None, 0.5), (3, None), (5, 0.8)])
def test_seeded_top_k_and_top_p_draw_what_choose_next_draws_with_that_seed(client, checkpoint, top_k, top_p):
    """Choice k of a request draws from a generator seeded with seed + k, through the same top-k and top-p: each
    text is choose_next's with that generator (and, the premise, not the text drawn without those controls)."""
    model, tok, _ = load_model(checkpoint)
    seed, new = 21, 30
    answer = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=new, temperature=1.0, seed=seed,
                                       n=2, top_p=top_p, extra_body={"top_k": top_k})
    for k, choice in enumerate(answer.choices):
        assert choice.text == reference_draw(model, tok, seed + k, new, top_k, top_p)
    assert any(choice.text != reference_draw(model, tok, seed + k, new, None, None)
               for k, choice in enumerate(answer.choices))


def test_a_stream_concatenates_to_the_whole_answer(server, client):
    args = dict(model="tiny-model", prompt=["naïve café", "emoji 🙂"], max_tokens=40, temperature=1.0, seed=5,
                n=2, stop=["ab", "\n"], logprobs=2)
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    texts, finish, tokens = {}, {}, {}
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            tokens[choice.index] = tokens.get(choice.index, []) + (choice.logprobs.tokens if choice.logprobs else [])
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert finish[choice.index] == choice.finish_reason
        assert tokens[choice.index] == choice.logprobs.tokens
        assert "ab" not in choice.text and "\n" not in choice.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


# ------------------------------------------------------------------------------------------- the API
def test_models_health_tokenize_and_detokenize(server, client, checkpoint):
    assert [m.id for m in client.models.list().data] == ["tiny-model"]
    assert get(server, "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    tok = Tokenizer.load(checkpoint / "tokenizer.json")
    text = "naïve 🙂<|endoftext|>"
    answer = post(server, "/tokenize", {"prompt": text}).json()
    assert answer["tokens"] == tok.encode(text, allowed_special="all") and answer["count"] == len(answer["tokens"])
    assert post(server, "/detokenize", {"tokens": answer["tokens"]}).json() == {"prompt": text}


def test_echo_logprobs_and_usage(server, client, checkpoint):
    model, tok, _ = load_model(checkpoint)
    answer = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                       logprobs=3)
    choice = answer.choices[0]
    ids = tok.encode(PROMPT)
    assert choice.text.startswith(PROMPT) and answer.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + answer.usage.completion_tokens
    shown = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                     for t in lp.tokens)  # a token that is part of a character is shown as "bytes:\xNN..."
    assert shown.decode("utf-8", errors="replace") == choice.text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert lp.text_offset == sorted(lp.text_offset)
    generated = tok.encode(choice.text[len(PROMPT):])
    with torch.no_grad():  # the first generated token's log-probability, from a forward pass of our own
        reference = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1, :tok.vocab_size], dim=-1)
    assert lp.token_logprobs[len(ids)] == pytest.approx(float(reference[generated[0]]), abs=1e-4)
    assert len(lp.top_logprobs[len(ids)]) == 3
    # Scoring a text without writing any (echo, max_tokens 0: how evaluation harnesses use this API).
    scored = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    with torch.no_grad():
        every = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1, :tok.vocab_size], dim=-1)
    expected = every.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    token_logprobs = scored.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_echo_logprobs_reach_the_choices_that_wait_for_a_row(client, checkpoint):
    """Six choices for the batch's four rows: those that wait are prefilled later, and their prompt's logprobs come
    all the same (the echo once went out at the first step, with nulls, and the values never followed)."""
    model, tok, _ = load_model(checkpoint)
    prompts = [PROMPT, "def f(x):"]
    answer = client.completions.create(model="tiny-model", prompt=prompts, n=3, max_tokens=3, temperature=0,
                                       echo=True, logprobs=1)
    assert [c.index for c in answer.choices] == list(range(6))
    for choice in answer.choices:
        ids = tok.encode(prompts[choice.index // 3])
        with torch.no_grad():
            every = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1, :tok.vocab_size], dim=-1)
        expected = every.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        token_logprobs = choice.logprobs.token_logprobs
        assert token_logprobs[0] is None and token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)


def test_end_of_text_finishes_with_stop_and_ignore_eos_goes_on(server, client):
    for seed in range(40):  # a random model ends a document now and then: find a seed where it does
        answer = client.completions.create(model="tiny-model", prompt="a", max_tokens=60, seed=seed)
        if answer.choices[0].finish_reason == "stop":
            break
    else:
        pytest.fail("no end-of-text in 40 seeded samples")
    assert answer.usage.completion_tokens < 60 and "<|endoftext|>" not in answer.choices[0].text
    longer = client.completions.create(model="tiny-model", prompt="a", max_tokens=60, seed=seed,
                                       extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 60
    assert longer.choices[0].text.startswith(answer.choices[0].text + "<|endoftext|>")


@pytest.mark.parametrize("body, status, param", [
    ('{"prompt": "x", ', 400, None),  # malformed JSON
    ('["x"]', 400, None),
    pytest.param("[" * 100000, 400, None, id="nested-too-deep"),  # deeper than Python's parser recurses
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 400]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100001}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": None, "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_k": 1.5}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 7}, 400, "n"),  # more than --max-queue 6 at once
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stop": ""}, 400, "stop"),  # it would stop before the first token: refused, as sample.py does
    ({"prompt": "x", "stop": ["\n", ""]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "seed": "s"}, 400, "seed"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "temprature": 1}, 400, "temprature"),  # a typo is not silently ignored
    ({"prompt": "x " * 100}, 400, "prompt"),  # longer than the 64 positions the model knows
    ({"prompt": "a\ud800b"}, 400, "prompt"),  # a lone surrogate (valid JSON, not text): was read as U+FFFD
    ({"prompt": ["ok", "\udfff"]}, 400, "prompt"),
    ({"prompt": "x", "stop": ["\ud83d"]}, 400, "stop"),  # half an emoji: a stop that could never match
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    answer = post(server, "/v1/completions", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    if param == "prompt" and status == 400 and "x " in str(body):
        assert error["code"] == "context_length_exceeded" and "64" in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_the_openai_client_sees_its_own_exception_types(client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-model", prompt="x", temperature=3)


def test_other_routes_and_methods_answer_in_the_same_shape(server):
    assert get(server, "/v1/nothing").json()["error"]["type"] == "not_found_error"
    answer = get(server, "/v1/completions")
    assert answer.status_code == 405 and "error" in answer.json()
    assert post(server, "/detokenize", {"tokens": [-1]}).status_code == 400
    assert post(server, "/tokenize", {"text": "x"}).status_code == 400
    assert post(server, "/tokenize", {"prompt": "\ud800"}).status_code == 400


def test_the_chat_api_says_this_server_serves_completions(client):
    """A new user's first call is often the chat API; it answered a bare "Not Found"."""
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in error.value.message and "chat" in error.value.message


def long_stream(server: str, n: int) -> Stream:
    """An open streaming request that would run for minutes (ignore_eos); close it to cancel it."""
    stream = Stream(server, {"prompt": "x", "n": n, "max_tokens": 100000, "ignore_eos": True})
    assert stream.first_line().startswith("data: ")  # it runs
    return stream


def wait_for_health(server: str, running: int, waiting: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = get(server, "/health").json()
        if (health["running"], health["waiting"]) == (running, waiting):
            return
        time.sleep(0.02)
    raise AssertionError(f"health stayed {health}, expected running {running}, waiting {waiting}")


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_place(server):
    running = long_stream(server, 4)  # fills the batch of 4
    waiting = Stream(server, {"prompt": "x", "n": 6, "max_tokens": 5, "ignore_eos": True})
    wait_for_health(server, 4, 6)
    refused = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    running.close()  # the client leaves mid-stream
    body = waiting.rest()  # the waiting ones get the rows, and finish
    assert body.endswith("data: [DONE]\n\n") and body.count('"finish_reason": "length"') == 6
    wait_for_health(server, 0, 0)
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_sequences_the_engine_has_taken_still_count_as_waiting_during_its_step(checkpoint):
    """The engine's thread takes the queued sequences at the start of a step, and the counts were refreshed only
    at its end: for a step the queue looked empty, and a request that a full queue must refuse was taken."""
    from minigpt.engine import Engine, Sequence
    from minigpt.server import ApiError, EngineWorker

    engine = Engine(load_model(checkpoint)[0], max_batch=1)
    in_step, release = threading.Event(), threading.Event()
    step = engine.step

    def held_step():
        in_step.set()
        release.wait(30)
        return step()

    engine.step = held_step
    worker = EngineWorker(engine, max_queue=2)
    worker.start()
    try:
        worker.submit([Sequence([1], 2) for _ in range(3)], lambda: None)  # one row and the queue of 2
        assert in_step.wait(30)  # the engine holds all three, in its first step
        assert worker.counts() == (0, 3)
        with pytest.raises(ApiError) as refused:
            worker.submit([Sequence([1], 2)], lambda: None)
        assert refused.value.status == 429
    finally:
        release.set()
        worker.stop()


def test_a_burst_on_an_idle_server_fills_the_free_rows_and_then_the_queue(checkpoint):
    """Requests sent before the engine's next step are not in a row yet: with 2 rows and a queue of 2, four
    single requests get in at once and the fifth is refused (before, the free rows were counted as queue)."""
    from minigpt.engine import Engine, Sequence
    from minigpt.server import ApiError, EngineWorker

    worker = EngineWorker(Engine(load_model(checkpoint)[0], max_batch=2), max_queue=2)  # not started: no step
    for _ in range(4):
        worker.submit([Sequence([1], 2)], lambda: None)
    assert worker.counts() == (0, 4)
    with pytest.raises(ApiError) as refused:
        worker.submit([Sequence([1], 2)], lambda: None)
    assert refused.value.status == 429


def test_a_waiting_client_that_leaves_frees_its_place_too(server):
    """Without streaming the server notices the closed connection while the answer is still being written."""
    conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 100000, "ignore_eos": True}),
                 headers={"Content-Type": "application/json"})
    wait_for_health(server, 1, 0)
    conn.sock.close()
    wait_for_health(server, 0, 0)


def test_a_top_p_too_small_for_float32_fails_no_request_beside_it(server, client):
    """top_p 1e-50 is 0 in float32: every token's probability became NaN, the engine's step failed, and every
    request in it with it (500). Now only the most likely token is left, and the request beside it runs on."""
    beside = long_stream(server, 1)
    wait_for_health(server, 1, 0)
    odd = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=10, top_p=1e-50, seed=1)
    assert odd.choices[0].text == client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=10,
                                                            temperature=0).choices[0].text
    wait_for_health(server, 1, 0)  # still decoding
    beside.close()
    wait_for_health(server, 0, 0)


def test_ctrl_c_ends_the_streams_in_flight_and_exits_0(checkpoint, tmp_path):
    log = tmp_path / "server.log"
    proc, url = start_server(checkpoint, log, "--grace", "0.3", "--max-tokens", "100000")
    stream = long_stream(url, 2)
    proc.send_signal(signal.SIGINT)
    body = stream.rest()
    assert proc.wait(timeout=30) == 0
    assert body.endswith("data: [DONE]\n\n") and body.count('"finish_reason": "abort"') == 2
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("args, words", [
    (["missing-folder"], "no checkpoint folder"),
    ([], "give a checkpoint folder"),
    (["out", "--max-batch", "0"], "--max-batch"),
    (["out", "--port", "70000"], "--port"),
    (["out", "--attention", "flash"], "--attention"),  # the settings sample.py takes, refused as it refuses them
    (["out", "--quantize", "int8", "--dtype", "bfloat16", "--device", "cpu"], "leave out --dtype bfloat16"),
    (["out", "--quantize", "int8", "--compile", "--device", "cpu"], "leave out --quantize or --compile"),
])
def test_bad_command_lines_fail_in_one_line(args, words, tmp_path, monkeypatch, capsys):
    from minigpt import serve

    monkeypatch.chdir(tmp_path)
    with mock.patch.object(sys, "argv", ["serve", *args]), pytest.raises(SystemExit) as exit_:
        serve.run_cli(serve.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_the_start_line_counts_an_int8_models_parameters_as_its_float_ones(checkpoint, monkeypatch, capsys):
    """torch's dynamic quantization turns Linear weights into packed int8 buffers that .parameters() no longer
    lists: the start line said 33,408 parameters for a 132,864-parameter model."""
    from minigpt import serve

    monkeypatch.setattr(serve._Server, "run", lambda self, sockets: None)  # print the start line, serve nothing
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    counts = []
    try:
        for flags in ([], ["--quantize", "int8"]):
            with mock.patch.object(sys, "argv", ["serve", str(checkpoint), "--port", "0", "--device", "cpu", *flags]):
                assert serve.main() == 0
            counts.append(re.search(r"\(([\d,]+) parameters", capsys.readouterr().out).group(1))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    assert counts == [f"{model.num_parameters():,}"] * 2


def test_a_hugging_face_folder_given_as_the_checkpoint_folder_is_told_to_use_init_from(tmp_path, monkeypatch,
                                                                                      capsys):
    """`serve hf_out` (say, what minigpt.export wrote) said "manifest.json is missing; is hf_out a checkpoint folder
    written by train.py?", which does not say that --init-from reads it."""
    from minigpt import serve

    (tmp_path / "hf_out").mkdir()
    (tmp_path / "hf_out" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    monkeypatch.chdir(tmp_path)
    with mock.patch.object(sys, "argv", ["serve", "hf_out"]), pytest.raises(SystemExit) as exit_:
        serve.run_cli(serve.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--init-from hf_out" in err, err


def test_an_address_not_of_this_machine_names_host_not_port():
    from minigpt.errors import MinigptError
    from minigpt.serve import _listen

    with pytest.raises(MinigptError, match="--host 192.0.2.1") as error:  # TEST-NET-1: no machine has it
        _listen("192.0.2.1", 0)
    assert "--port" not in str(error.value)


def test_the_model_id_is_the_folders_name_and_a_best_subfolder_says_whose(tmp_path, monkeypatch):
    from minigpt.serve import name_of

    (tmp_path / "out" / "best").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert name_of("out", None) == "out"
    assert name_of("out/best/", None) == name_of(str(tmp_path / "out" / "best"), None) == "out/best"
    assert name_of(None, "gpt2") == "gpt2"  # a hub name, as given
    assert name_of(None, "out") == "out"  # a Hugging Face folder


# ------------------------------------------------------------------------------------------- the page
BROWSER_REQUIRED = os.environ.get("MINIGPT_BROWSER_TESTS") == "1"  # .ci/run sets it: there the test must run
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the page's browser test needs playwright (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "the page's browser test needs Debian's chromium (apt-get install chromium)"
    return None


MISSING = browser_missing()


@pytest.mark.skipif(MISSING is not None and not BROWSER_REQUIRED, reason=str(MISSING))
def test_the_page_streams_a_completion_in_a_real_browser(server, client, tmp_path):
    if MISSING:
        pytest.fail(f"MINIGPT_BROWSER_TESTS=1 but {MISSING}")
    from playwright.sync_api import sync_playwright

    expected = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=400, temperature=0)
    with sync_playwright() as p:  # a fresh profile folder, as Debian's chromium wants
        browser = p.chromium.launch_persistent_context(tmp_path / "profile", executable_path=CHROMIUM,
                                                       args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-model'")
            page.fill("#prompt", PROMPT)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "400")
            # Count the times the completion grows: streamed text arrives in pieces, not at once.
            page.evaluate("""() => { window.growths = 0; new MutationObserver(() => window.growths++)
                .observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true});
                window.labels = []; const stats = document.getElementById('stats');
                new MutationObserver(() => window.labels.push(stats.textContent))
                .observe(stats, {subtree: true, childList: true, characterData: true}); }""")
            page.click("#generate")
            page.wait_for_function("document.getElementById('stats').dataset.state === 'done'", timeout=30000)
            assert page.inner_text("#completion") == expected.choices[0].text
            stats = page.inner_text("#stats")
            assert re.search(rf"^{expected.usage.completion_tokens} tokens in [\d.]+s: [\d.]+ tokens/s", stats), stats
            assert page.evaluate("window.growths") > 10
            # While it streams, the page counts tokens (it once counted chunks and called them tokens).
            counts = [int(label.split()[0]) for label in page.evaluate("window.labels")
                      if re.fullmatch(r"\d+ tokens, [\d.]+ tokens/s", label)]
            assert counts and max(counts) == expected.usage.completion_tokens, page.evaluate("window.labels")
            assert not errors
        finally:
            browser.close()
