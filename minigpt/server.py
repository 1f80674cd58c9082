"""OpenAI's completions API over the engine, and a page to try it.

    HTTP request ─► checked (`parse_completion`: OpenAI's error shape for anything wrong) ─► one engine Sequence
    per prompt and choice ─► EngineWorker (the engine on a thread of its own, one step for every sequence) ─►
    tokens ─► TextStream (UTF-8-safe text, stop strings held back until decided) ─► JSON, or server-sent events

The event loop only parses, queues and formats; the model runs on the engine's thread, whose torch calls release
the interpreter lock, so a request that arrives while others decode is read and queued at once and joins them at
the next step. A request that finishes its text at a stop string, or whose client leaves, is cancelled and its
row freed at the engine's next step.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, ContextManager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .config import PROMPT_CONTEXTS
from .engine import Engine, Sampling, Sequence
from .generate import is_int
from .textstream import TextStream

log = logging.getLogger("minigpt.server")
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 5  # and on logprobs
MAX_N = 128  # and on completions per prompt
RETRY_AFTER_S = 1  # what a refused client is told to wait when the queue is full


@dataclass
class ServerLimits:
    """What one server accepts; the defaults of `python -m minigpt.serve`'s flags."""

    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # sequences waiting for a row; beyond it a request is refused with 429
    max_tokens: int = 1024  # the largest max_tokens a request may ask for


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------- the request
@dataclass
class CompletionRequest:
    """A checked /v1/completions body."""

    prompts: list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    ignore_eos: bool = False


# Accepted only at the value that means "off": a setting that cannot be honoured is refused, never dropped.
UNSUPPORTED = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",)}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream", "stream_options",
         "seed", "echo", "logprobs", "user", "best_of", "ignore_eos", *UNSUPPORTED}


def parse_completion(body: Any, tokenizer, limits: ServerLimits, max_prompt: int) -> CompletionRequest:
    """The request in `body` (parsed JSON), or ApiError(400) naming the first field that is wrong and why."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, off in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in off:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", name)
    req = CompletionRequest(prompts=prompt_ids(body.get("prompt"), tokenizer, max_prompt))
    req.max_tokens = _integer(body, "max_tokens", 16, 0, limits.max_tokens,
                              hint=" (this server's --max-tokens)")
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", None, 0.0, 1.0, open_low=True)
    top_k = body.get("top_k")
    req.top_k = None if top_k in (None, -1, 0) else _integer(body, "top_k", None, 1, None, hint=" (-1 for none)")
    req.n = _integer(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise ApiError(400, "best_of other than n is not supported by this server; leave it out", "best_of")
    if len(req.prompts) * req.n > limits.max_queue:
        raise ApiError(400, f"{len(req.prompts)} prompt(s) x n={req.n} completions is more than this server queues "
                            f"at once ({limits.max_queue}, --max-queue); send fewer", "n")
    req.stop = _stops(body.get("stop"))
    req.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, 'stream_options must be an object such as {"include_usage": true}', "stream_options")
        if not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        req.include_usage = _boolean(options, "include_usage")
    req.seed = _integer(body, "seed", None, -2 ** 63, 2 ** 64 - 1)
    req.echo = _boolean(body, "echo")
    req.logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    req.ignore_eos = _boolean(body, "ignore_eos")  # vLLM's extension: go on past end-of-text (benchmarks)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "user must be a string", "user")
    return req


def prompt_ids(prompt: Any, tokenizer, max_prompt: int) -> list[list[int]]:
    """OpenAI's prompt forms (a string, a list of strings, a list of token ids, a list of lists of ids) as lists
    of ids; an empty prompt starts a new document (the end-of-text token), as sample.py does."""
    if prompt is None:
        prompt = ""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                            "token ids (not empty)", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):  # <|endoftext|> is the document separator, as OpenAI's
            ids = tokenizer.encode(_text(p, "prompt"), allowed_special="all")
        elif all(is_int(t) and 0 <= t < tokenizer.vocab_size for t in p):
            ids = list(p)
        else:
            raise ApiError(400, f"prompt token ids must be integers in [0, {tokenizer.vocab_size - 1}]", "prompt")
        if not ids:
            ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
        if len(ids) > max_prompt:
            raise ApiError(400, f"this model's maximum context length is {max_prompt} tokens; the prompt has "
                                f"{len(ids)}: shorten it", "prompt", "context_length_exceeded")
        out.append(ids)
    return out


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None, hint: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value) or value < low or (high is not None and value > high):
        within = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be an integer {within}{hint}, got {json.dumps(value)}", name)
    return value


def _number(body: dict, name: str, default: float | None, low: float, high: float,
            open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < low or value > high or (open_low and value == low)):
        raise ApiError(400, f"{name} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], "
                            f"got {json.dumps(value)}", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _text(value: str, param: str) -> str:
    """`value`, if it is text: JSON's escapes can carry a lone surrogate ("\\ud800"), which UTF-8 cannot encode and
    the tokenizer would silently read as U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character "
                            f"{exc.start}), which is not text; send whole characters", param) from None
    return value


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    for s in stops:
        _text(s, "stop")
    if "" in stops:
        raise ApiError(400, 'stop "" would stop before the first token; give the text to stop at, or no stop',
                       "stop")
    return tuple(stops)


# ------------------------------------------------------------------------------------------- the engine's thread
class EngineWorker:
    """Runs the engine on a thread of its own: sequences come in through `submit`, and after each step the
    `notify` callback of every request whose sequences changed is called (from the engine's thread)."""

    def __init__(self, engine: Engine, max_queue: int,
                 step_context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._step_context = step_context  # e.g. autocast, which is per thread
        self._inbox: list[tuple[list[Sequence], Callable[[], None]]] = []
        self._listeners: dict[Sequence, Callable[[], None]] = {}  # the engine's thread only
        self._wake = threading.Condition()
        self._closed = False  # no more submissions (shutting down)
        self._cancelling = False  # cancel everything queued or running
        self._stopping = False  # end the thread once nothing runs
        # What the engine held after its last step (its own lists change during a step): running, waiting, busy.
        self._running = self._waiting = 0
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="minigpt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        """Sequences running and waiting (those not yet given to the engine included)."""
        with self._wake:
            return self._running, self._waiting + sum(len(seqs) for seqs, _ in self._inbox)

    def busy(self) -> bool:
        with self._wake:
            return bool(self._inbox) or self._busy

    def submit(self, seqs: list[Sequence], notify: Callable[[], None]) -> None:
        """Queue `seqs`; ApiError 429 when the queue cannot take them, 503 when the server is stopping."""
        with self._wake:
            if self._closed:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            # Room: the engine's free rows, then the queue. Counted together, so that a burst on an idle server
            # fills the rows before the queue refuses anything (the sequences sent are not in a row until a step).
            waiting = self._waiting + sum(len(s) for s, _ in self._inbox)
            held = self._running + waiting
            if held and held + len(seqs) > self.engine.max_batch + self.max_queue:
                raise ApiError(429, f"the server is busy: {self._running} completions are running and {waiting} "
                                    f"waiting (--max-batch {self.engine.max_batch}, --max-queue {self.max_queue}); "
                                    f"retry in a moment", kind="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._inbox.append((seqs, notify))
            self._wake.notify()

    async def drain(self, seconds: float) -> None:
        """Take no more requests, give those in flight `seconds` to finish, then cancel the rest (their streams end
        with finish_reason "abort" and [DONE], not a cut connection)."""
        with self._wake:
            self._closed = True
        deadline = time.monotonic() + seconds
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._wake:
            self._cancelling = True
            self._wake.notify()
        while self.busy():
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        """Cancel everything queued or running, tell their requests, and end the thread."""
        with self._wake:
            self._closed = self._cancelling = self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self.engine.has_work or self._stopping):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                # Waiting until the step says where they are: counted from the inbox, the sequences would vanish
                # from `counts` for a step, and `submit` would take a request that the full queue must refuse.
                self._waiting += sum(len(seqs) for seqs, _ in inbox)
                cancelling, stopping = self._cancelling, self._stopping
                self._busy = True
            done_at_once = []  # max_tokens 0, or refused: finished without a step
            for seqs, notify in inbox:
                for seq in seqs:
                    self._listeners[seq] = notify
                    self._add(seq)
                    if seq.finished:
                        done_at_once.append(seq)
            if cancelling:
                for seq in self._listeners:
                    Engine.cancel(seq)
            try:
                with self._step_context():
                    changed = done_at_once + self.engine.step()
            except Exception as exc:  # a fault of ours must not take the server down: fail what ran, go on
                log.error("engine step failed: %s: %s", type(exc).__name__, exc)
                failed = self.engine.clear()
                for seq in failed:
                    seq.finish_reason = "error"
                changed = done_at_once + failed
            with self._wake:
                self._running, self._waiting = len(self.engine.running), len(self.engine.waiting)
                self._busy = self.engine.has_work
            notify = {self._listeners[seq] for seq in changed if seq in self._listeners}
            for seq in changed:
                if seq.finished:
                    self._listeners.pop(seq, None)
            for callback in notify:
                callback()
            if stopping and not self.engine.has_work:
                return

    def _add(self, seq: Sequence) -> None:
        try:
            self.engine.add(seq)
        except Exception as exc:  # parse_completion checks everything the engine does; this is a safety net
            seq.finish_reason = "error"
            log.error("engine refused a sequence: %s", exc)


# ------------------------------------------------------------------------------------------- one completion
class Choice:
    """One sequence's answer as the client sees it: text as it becomes safe to show, logprobs, finish reason."""

    def __init__(self, index: int, seq: Sequence, tokenizer, req: CompletionRequest) -> None:
        self.index, self.seq, self.tokenizer = index, seq, tokenizer
        self.text = TextStream(tokenizer, req.stop)
        self.eot_id = None if req.ignore_eos else tokenizer.eot_id
        self.read = 0  # tokens of seq taken in so far
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.want_logprobs = req.logprobs is not None
        self.echo = tokenizer.decode(seq.prompt) if req.echo else ""
        # text_offset: the characters of every token in logprobs so far (echo included), counted as they come (a
        # character split over tokens counts once complete, so a token that starts one gets its start).
        self.shown_chars = 0
        self.shown_utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def take(self) -> tuple[str, dict | None]:
        """The text that became safe since the last call and the logprobs of the tokens taken in with it; sets
        finish_reason once the choice is complete."""
        if self.finish_reason is not None:
            return "", None
        piece, entries = "", []
        if self.echo:
            if self.want_logprobs and self.seq.prompt_logprobs is None and not self.seq.finished:
                return "", None  # still waiting for a row: its prompt is scored when it is prefilled
            piece, self.echo = self.echo, ""
            if self.want_logprobs:
                entries += self._prompt_entries()
        finished = self.seq.finished  # read first: the engine's thread adds a sequence's tokens, then finishes it
        tokens, records = self.seq.tokens, self.seq.logprobs
        end = len(tokens)
        while self.read < end and self.finish_reason is None:
            token = tokens[self.read]
            record = records[self.read] if self.want_logprobs else None
            self.read += 1
            if token == self.eot_id:
                self.finish_reason = "stop"
                break
            self.completion_tokens += 1
            piece += self.text.push(token)
            if record is not None:
                entries.append(self._entry(token, record.logprob, record.top))
            if self.text.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and self.read == end and finished:
            self.finish_reason = {"stop": "stop", "length": "length"}.get(self.seq.finish_reason, "abort")
        if self.finish_reason is not None:
            piece += self.text.finish()
        return piece, self._logprobs(entries) if self.want_logprobs else None

    def _prompt_entries(self) -> list[tuple]:
        records = self.seq.prompt_logprobs or [None] * len(self.seq.prompt)
        return [self._entry(t, r.logprob if r else None, r.top if r else None)
                for t, r in zip(self.seq.prompt, records)]

    def _entry(self, token: int, logprob: float | None, top: list | None) -> tuple:
        offset = self.shown_chars
        self.shown_chars += len(self.shown_utf8.decode(self.tokenizer.decode_bytes([token])))
        return (self._token_text(token), logprob,
                {self._token_text(i): lp for i, lp in top} if top is not None else None, offset)

    def _token_text(self, token: int) -> str:
        """A token as OpenAI shows it in logprobs: its text, or "bytes:\\xNN..." when it is part of a character."""
        raw = self.tokenizer.decode_bytes([token])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @staticmethod
    def _logprobs(entries: list[tuple]) -> dict[str, list]:
        """OpenAI's (legacy completions) logprobs object for these tokens."""
        tokens, token_logprobs, top, offsets = (list(column) for column in zip(*entries)) if entries else ([],) * 4
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


# ------------------------------------------------------------------------------------------- the application
def create_app(model, tokenizer, model_id: str, limits: ServerLimits | None = None,
               step_context: Callable[[], ContextManager] = contextlib.nullcontext, compile: bool = False):
    """The FastAPI application serving `model`; the engine's thread starts and stops with it (its lifespan).
    compile: the engine decodes with its compiled step of fixed shapes (CUDA graphs on a GPU; Engine)."""
    limits = limits or ServerLimits()
    config = model.config
    max_prompt = config.context_limit or PROMPT_CONTEXTS * config.block_size
    vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None
    worker = EngineWorker(Engine(model, limits.max_batch, vocab_limit, compile=compile), limits.max_queue,
                          step_context)
    device = model.wte.weight.device
    started = int(time.time())
    page = PAGE.read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def check_model(name: Any) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"the model {json.dumps(name)} does not exist; this server has {json.dumps(model_id)}",
                           "model", "model_not_found")

    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the request body nests JSON arrays or objects too deeply") from None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        running, waiting = worker.counts()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "minigpt",
                "max_model_len": max_prompt}

    @app.post("/tokenize")
    @_guarded
    async def tokenize(request: Request):
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, 'the body must be {"prompt": "some text"}', "prompt")
        check_model(body.get("model"))
        tokens = tokenizer.encode(_text(body["prompt"], "prompt"), allowed_special="all")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_prompt}

    @app.post("/detokenize")
    @_guarded
    async def detokenize(request: Request):
        body = await json_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(is_int(t) and 0 <= t < tokenizer.vocab_size for t in tokens):
            raise ApiError(400, f'the body must be {{"tokens": [ids]}} with ids in [0, {tokenizer.vocab_size - 1}]',
                           "tokens")
        check_model(body.get("model"))
        try:
            return {"prompt": tokenizer.decode(tokens)}
        except ValueError as exc:  # an id inside the range that this vocabulary leaves unused
            raise ApiError(400, str(exc), "tokens") from None

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(404, "this server has no chat API: it serves a model trained on plain text, which has no chat "
                            "template; use /v1/completions (client.completions.create) with a prompt",
                       kind="not_found_error")

    @app.post("/v1/completions")
    @_guarded
    async def completions(request: Request):
        body = await json_body(request)
        check_model(body.get("model") if isinstance(body, dict) else None)
        req = parse_completion(body, tokenizer, limits, max_prompt)
        seqs, choices = [], []
        for p, ids in enumerate(req.prompts):
            for c in range(req.n):
                k = p * req.n + c
                generator = None
                if req.seed is not None:  # choice k draws from its own generator, seeded with seed + k
                    generator = torch.Generator(device=device).manual_seed((req.seed + k) % 2 ** 64)
                sampling = Sampling(req.temperature, req.top_k, req.top_p, generator)
                stop_id = None if req.ignore_eos else tokenizer.eot_id
                seq = Sequence(ids, req.max_tokens, sampling, stop_id, req.logprobs,
                               prompt_logprobs=req.echo and req.logprobs is not None)
                seqs.append(seq)
                choices.append(Choice(k, seq, tokenizer, req))
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        worker.submit(seqs, lambda: loop.call_soon_threadsafe(changed.set))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}

        def usage() -> dict[str, int]:
            prompt, completion = sum(map(len, req.prompts)), sum(c.completion_tokens for c in choices)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        updates = _updates(choices, changed)
        if req.stream:
            return StreamingResponse(_events(head, updates, usage if req.include_usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = {c.index: "" for c in choices}
        logprobs: dict[int, dict | None] = {c.index: None for c in choices}

        async def collect() -> None:
            async for choice, piece, lp in updates:
                texts[choice.index] += piece
                if lp is not None:
                    logprobs[choice.index] = _merge(logprobs[choice.index], lp)

        await _unless_disconnected(request, collect())
        if any(c.seq.finish_reason == "error" for c in choices):
            raise ApiError(500, "the model failed on this request; see the server's log", kind="server_error")
        return {**head, "choices": [{"text": texts[c.index], "index": c.index, "logprobs": logprobs[c.index],
                                     "finish_reason": c.finish_reason} for c in choices], "usage": usage()}

    return app


def _guarded(endpoint):
    """An endpoint whose unexpected exceptions (faults of ours) become a logged line and OpenAI's 500, not a
    traceback on the console."""
    @functools.wraps(endpoint)
    async def guarded(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except (ApiError, HTTPException, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.error("%s failed: %s: %s", endpoint.__name__, type(exc).__name__, exc)
            raise ApiError(500, f"the server failed on this request ({type(exc).__name__}); see its log",
                           kind="server_error") from None

    return guarded


async def _updates(choices: list[Choice], changed: asyncio.Event) -> AsyncIterator[tuple[Choice, str, dict | None]]:
    """(choice, new text, its logprobs) whenever the engine has moved a choice on, until every one is finished.
    Leaving early (a client gone) cancels what still runs; a choice ended by a stop string is cancelled at once."""
    try:
        while True:
            await changed.wait()
            changed.clear()
            for choice in choices:
                if choice.finish_reason is None:
                    piece, lp = choice.take()
                    if choice.finish_reason is not None and not choice.seq.finished:
                        Engine.cancel(choice.seq)  # a stop string: free its row now
                    if piece or lp is not None and lp["tokens"] or choice.finish_reason is not None:
                        yield choice, piece, lp
            if all(c.finish_reason is not None for c in choices):
                return
    finally:
        for choice in choices:
            if not choice.seq.finished:
                Engine.cancel(choice.seq)


async def _events(head: dict, updates: AsyncIterator, usage: Callable[[], dict] | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    try:
        async for choice, piece, lp in updates:
            if choice.seq.finish_reason == "error":
                yield _sse(ApiError(500, "the model failed on this request", kind="server_error").body())
                continue
            yield _sse({**head, "choices": [{"text": piece, "index": choice.index, "logprobs": lp,
                                             "finish_reason": choice.finish_reason}]})
        if usage is not None:
            yield _sse({**head, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"
    finally:
        await updates.aclose()  # a client that left: its sequences are cancelled now, not when collected


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _merge(into: dict | None, more: dict) -> dict:
    if into is None:
        return more
    return {key: into[key] + more[key] for key in into}


async def _unless_disconnected(request, work) -> None:
    """Await `work`; if the client disconnects first, cancel it (which cancels its sequences)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "the client closed the request")
    task.result()

