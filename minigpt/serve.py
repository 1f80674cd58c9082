"""Serve a model over OpenAI's completions API, with a page to try it at the same address.

    python -m minigpt.serve out                       # a checkpoint folder written by train.py (or out/best)
    python -m minigpt.serve --init-from ./gpt2-local  # a GPT-2-family model: a Hugging Face folder or hub name
    python -m minigpt.serve out --port 0              # any free port; the address printed is the one bound

Requests that arrive together are decoded together (minigpt/engine.py). Ctrl-C stops taking requests, lets those
in flight finish for a few seconds, cancels the rest, and exits.
"""
from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from .checkpoint import BEST_DIR
from .config import ATTENTION_CHOICES, DEVICES, DTYPES, OPEN_CHOICES, expand_path
from .errors import ConfigError, MinigptError, run_cli
from .server import EngineWorker, ServerLimits


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see `python -m minigpt.serve --help`)")


def build_parser() -> argparse.ArgumentParser:
    limits = ServerLimits()
    p = _Parser(prog="python -m minigpt.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", type=expand_path, default=None,
                   help="checkpoint folder written by train.py (its best/ subfolder: the best-validation model)")
    p.add_argument("--init-from", metavar="FOLDER|NAME", type=expand_path, default=None,
                   help="a pretrained GPT-2-family model instead: a Hugging Face folder or hub name (gpt2, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000); 0 picks a free one")
    p.add_argument("--device", default="auto",
                   help=f"one of {', '.join(DEVICES)}, or {OPEN_CHOICES['device']} (default: auto: cuda, else mps, "
                        "else cpu)")
    p.add_argument("--dtype", default="auto", help=f"one of {', '.join(DTYPES)} (default: auto, bfloat16 on CUDA "
                   "(float16 on GPUs without bfloat16), float32 elsewhere)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel of the prompts' prefill, as sample.py's (default: auto: flex for ALiBi on "
                        "CUDA, else sdpa)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU inference with int8 Linear weights (faster decoding, slightly higher loss)")
    p.add_argument("--compile", action="store_true",
                   help="decode with CUDA graphs: the decoding step of --max-batch rows compiled once "
                        "(torch.compile); the first request waits for the compilation. Each step decodes all "
                        "--max-batch rows, running or not: a CPU (no CUDA graphs) pays a full batch's step however "
                        "few requests run")
    p.add_argument("--max-batch", type=int, default=limits.max_batch, help=f"sequences decoded together (default: {limits.max_batch})")
    p.add_argument("--max-queue", type=int, default=limits.max_queue,
                   help=f"sequences waiting for a place (default: {limits.max_queue}); more requests are refused "
                        "with 429 and Retry-After")
    p.add_argument("--max-tokens", type=int, default=limits.max_tokens,
                   help=f"the largest max_tokens a request may ask for (default: {limits.max_tokens})")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="after Ctrl-C, how long requests in flight may finish before they are cancelled (default: 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model (default: torch's choice, one per core)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if (args.out_dir is None) == (args.init_from is None):
        raise ConfigError("give a checkpoint folder (python -m minigpt.serve out) or --init-from, not both or none")
    for name in ("max_batch", "max_queue", "max_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.grace < 0:
        raise ConfigError(f"--grace must be >= 0 seconds, got {args.grace}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    import torch

    from .inference import load_for_inference
    from .server import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_for_inference(args.out_dir, args.init_from, args.device, args.dtype, args.quantize, args.attention,
                                args.compile)
    model = loaded.model
    model_id = name_of(args.out_dir, args.init_from)
    limits = ServerLimits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens)
    app = create_app(model, loaded.tokenizer, model_id, limits, loaded.autocast, loaded.compile)

    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    int8 = ", int8" if args.quantize else ""
    print(f"serving {model_id} ({loaded.parameters:,} parameters{int8}, {loaded.device}) at http://{shown}:{port}"
          f"  (OpenAI API under /v1; Ctrl-C to stop)", flush=True)
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1), app.state.worker, args.grace)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again so that a default handler can
    # end the process; the shutdown is already complete by then, so these no-op handlers let main return 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("stopped", file=sys.stderr)
    return 0


def name_of(out_dir: str | None, init_from: str | None) -> str:
    """The model id the server answers to: its folder's name, or the hub name. A checkpoint's best/ subfolder is
    "out/best": "best" alone would not say whose."""
    name = str(init_from or out_dir).rstrip("/")
    if not Path(name).is_dir():
        return name
    folder = Path(name).resolve()
    if out_dir is not None and folder.name == BEST_DIR:
        return f"{folder.parent.name}/{folder.name}"
    return folder.name


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first lets the engine finish its requests (`grace` seconds at most) and
    cancels the rest, so that every response ends properly before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace: float) -> None:
        super().__init__(config)
        self.worker, self.grace = worker, grace

    async def shutdown(self, sockets=None) -> None:
        await self.worker.drain(self.grace)
        await super().shutdown(sockets)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything is printed, so that the address shown is the one in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine knows: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        fix = (f"--host {host} is not an address of this machine; give one of its own (127.0.0.1, or 0.0.0.0 for "
               f"every interface)" if exc.errno == errno.EADDRNOTAVAIL else "pick another --port (0: any free one)")
        raise MinigptError(f"cannot listen on {host}:{port}: {exc.strerror}; {fix}") from None
    sock.listen(2048)
    return sock


if __name__ == "__main__":
    run_cli(main)
