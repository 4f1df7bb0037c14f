"""llm-serve: an OpenAI-compatible HTTP server for one checkpoint, with a chat page.

    llm-serve CKPT                                  http://127.0.0.1:8000 (this machine only)
    llm-serve CKPT --port 0                         any free port (the line on stderr says which)
    TRITONLM_API_KEY=secret llm-serve CKPT          clients must send "Authorization: Bearer secret"

Requests join a continuously batched decode loop (``--max-batch`` rows); up to
``--max-queue`` more wait, and beyond that the server answers 429 with Retry-After.
Each finished request writes one JSON log line on stderr (id, tokens in/out, time to
first token, tokens/s). SIGINT or SIGTERM stops the server cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys

from tritonlm.engine.errors import os_reason

from .common import Parser, UsageError, run_main
from .device import add_device_flags, device_and_backend
from .threads_flag import add_threads_flag, apply_threads

PROG = "llm-serve"
API_KEY_ENV = "TRITONLM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Serve a tritonlm checkpoint over the OpenAI HTTP API.",
               epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (from llm-train)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000,
                   help="port (default: 8000; 0 = any free port)")  # fmt: skip
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require this bearer key (default: ${API_KEY_ENV} if set)")  # fmt: skip
    p.add_argument("--max-batch", type=_int_in(1, 4096), default=16, metavar="N",
                   help="rows decoded together (default: 16)")  # fmt: skip
    p.add_argument("--max-queue", type=_int_in(0, 1 << 20), default=64, metavar="N",
                   help="requests that may wait for a row; more get 429 (default: 64)")  # fmt: skip
    p.add_argument("--max-new-tokens-cap", type=_int_in(1, 1 << 20), default=512, metavar="N",
                   help="largest max_tokens a request may ask for (default: 512)")  # fmt: skip
    p.add_argument("--prefix-cache-tokens", type=_int_in(0, 1 << 30), default=4096, metavar="N",
                   help="tokens of prompt K/V kept for reuse by later prompts that start "
                        "with them (LRU; 0 = off; default: 4096)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=_int_in(1, 1 << 30), default=1 << 20, metavar="N",
                   help="largest request body (default: 1 MiB)")  # fmt: skip
    p.add_argument(
        "--model-name",
        metavar="NAME",
        help="the model id clients use (default: the checkpoint's folder name)",
    )
    add_device_flags(p)
    add_threads_flag(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (compiles per batch size at first use)",
    )
    p.add_argument("--no-graphs", action="store_true",
                   help="on CUDA, do not capture the decode step as CUDA graphs")  # fmt: skip
    return p


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    return parse


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading anything slow, so a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {os_reason(e)}") from None
    return sock


def _log_done(handle, result) -> None:
    """One structured line per finished request (no progress bars)."""
    rec = {"event": "done", "id": handle.id, "prompt_tokens": result.prompt_tokens,
           "completion_tokens": result.new_tokens, "finish": result.stop_reason,
           "ttft_s": round(result.time_to_first_token_s, 4),
           "elapsed_s": round(result.elapsed_s, 4),
           "tokens_per_s": round(result.tokens_per_s, 1)}  # fmt: skip
    logging.getLogger(PROG).info(json.dumps(rec))


def api_key_of(args: argparse.Namespace, environ=os.environ) -> str | None:
    """The bearer key: --api-key, else $TRITONLM_API_KEY (unset or "" = serve without one).
    A key of spaces is refused, not kept: the header's token is compared stripped, so no
    request could ever match it; surrounding spaces are dropped for the same reason."""
    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
    else:
        key, where = environ.get(API_KEY_ENV, ""), f"${API_KEY_ENV}"
        if key == "":
            return None
    if not key.strip():
        raise UsageError(f"{where} is empty (or only spaces): give a key, or leave it out to "
                         "serve without one")  # fmt: skip
    return key.strip()


def serve(args: argparse.Namespace) -> int:
    api_key = api_key_of(args)
    apply_threads(args)
    sock = _bind(args.host, args.port)
    device = device_and_backend(args)
    from tritonlm.engine.inference.prefix_cache import PrefixCache
    from tritonlm.engine.inference.scheduler import Scheduler
    from tritonlm.engine.inference.serve_request import Limits

    from .chat_session import load
    from .serve_app import create_app

    ckpt = load(args.checkpoint, device=device, backend=args.backend, compiled=args.compile)
    name = args.model_name or os.path.basename(os.path.abspath(args.checkpoint))
    limits = Limits(name, ckpt.model.config.max_seq_len, args.max_new_tokens_cap)
    metrics = _metrics()

    def on_done(handle, result) -> None:
        _log_done(handle, result)
        if metrics is not None:
            metrics.on_done(handle, result)

    from tritonlm.engine.model.cuda_graphs import pick_decode_mode

    decode = pick_decode_mode(device, graphs=not args.no_graphs, compile=args.compile)
    prefix = PrefixCache(args.prefix_cache_tokens) if args.prefix_cache_tokens else None
    scheduler = Scheduler(ckpt.model, ckpt.tokenizer, args.max_batch, args.max_queue,
                          on_done=on_done, prefix_cache=prefix, decode=decode,
                          on_fallback=logging.getLogger(PROG).warning).start()  # fmt: skip
    if metrics is not None:
        metrics.watch(scheduler)
    app = create_app(scheduler, ckpt.tokenizer, limits, api_key, args.max_body_bytes, metrics,
                     _grammars(ckpt))  # fmt: skip
    import uvicorn

    _Server = _server_class()
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    host, port = sock.getsockname()[:2]
    ready = {"event": "listening", "url": f"http://{host}:{port}", "model": name,
             "auth": api_key is not None, "max_batch": args.max_batch}  # fmt: skip
    logging.getLogger(PROG).info(json.dumps(ready))
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    logging.getLogger(PROG).info(json.dumps({"event": "stopped", "signals": server.signals}))
    return 0


def _metrics():
    """The /metrics registry, or None (one log line) without prometheus-client installed."""
    try:
        from .serve_metrics import ServeMetrics
    except ImportError:
        why = "install prometheus-client (pip install 'tritonlm[serve]')"
        logging.getLogger(PROG).info(json.dumps({"event": "no_metrics", "why": why}))
        return None
    return ServeMetrics()


def _grammars(ckpt):
    """response_format's compiler, or None (one log line) without xgrammar installed."""
    from tritonlm.engine.inference.grammar import GrammarError, Grammars

    try:
        return Grammars(ckpt.tokenizer, ckpt.model.config.vocab_size)
    except GrammarError as e:
        logging.getLogger(PROG).info(json.dumps({"event": "no_response_format", "why": str(e)}))
        return None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGINT/SIGTERM that stopped it cleanly is not
        raised again afterwards (uvicorn re-raises it): llm-serve then exits with 0."""

        signals: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self.signals = [int(s) for s in self._captured_signals]
                    self._captured_signals.clear()

    return Server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    return run_main(PROG, lambda: serve(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
