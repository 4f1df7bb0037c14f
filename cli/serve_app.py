"""llm-serve's HTTP layer: FastAPI routes that read bytes and write OpenAI-shaped JSON/SSE.

Everything a request means is decided in the engine (:mod:`tritonlm.engine.inference.serve_request`
validates it, :mod:`tritonlm.engine.inference.scheduler` runs it); this module only moves bytes:

    POST /v1/chat/completions, /v1/completions   JSON, or SSE chunks ending in [DONE]
    GET  /v1/models, /v1/models/{id}, /health (and HEAD), / (the chat page)

Every error is ``{"error": {"message", "type", "param", "code"}}`` with its status (400
bad field, 401 key, 404 model or route, 405, 413 body too big, 429 + Retry-After queue
full, 500 engine failure). A client that goes away cancels its request, which frees the
row at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from tritonlm.engine.inference.scheduler import QueueFull, Scheduler
from tritonlm.engine.inference.serve_request import (
    Limits,
    RequestError,
    decode_body,
    parse_request,
)

from .serve_stream import Shape, error_response, sse, whole

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format

PAGE = Path(__file__).parent / "static" / "chat.html"
LOG = logging.getLogger("llm-serve")


def create_app(scheduler: Scheduler, tokenizer, limits: Limits, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, metrics=None, grammars=None) -> FastAPI:  # fmt: skip
    """The app for one loaded model (the API cannot load files or switch checkpoints).
    ``metrics``: a :class:`~tritonlm.cli.serve_metrics.ServeMetrics` for GET /metrics;
    ``grammars``: the :class:`~tritonlm.engine.inference.grammar.Grammars` that compiles
    response formats (None: they are refused)."""
    app = FastAPI(title="llm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    mailboxes: dict[int, _Mailbox] = {}  # one per event loop (uvicorn runs one)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route, 405, ...
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(RequestError(str(exc.detail), code=code, status=exc.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        LOG.exception("internal error")
        err = RequestError(f"internal error: {exc}", status=500, type="server_error")
        return error_response(err)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise RequestError("invalid or missing API key (Authorization: Bearer KEY)",
                               code="invalid_api_key", status=401)  # fmt: skip

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_big(max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _too_big(max_body_bytes)
            chunks.append(chunk)
        return decode_body(b"".join(chunks))

    async def completion(request: Request, kind: str):
        try:
            check_key(request)
            body = await read_json(request)
            # Tokenizing up to max_body_bytes of text takes a while: off the event loop.
            req = await asyncio.to_thread(parse_request, body, kind, tokenizer, limits, grammars)
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
            events: asyncio.Queue = asyncio.Queue()  # (choice index, Event)
            mailbox = mailboxes.setdefault(id(asyncio.get_running_loop()), _Mailbox())

            def notify_for(index: int):
                return lambda event: mailbox.post(events, (index, event))  # scheduler thread

            rows = req.rows()
            handles = scheduler.submit_many([
                (prompt, cfg, notify_for(i), rid if len(rows) == 1 else f"{rid}-{i}", req.options)
                for i, prompt, cfg in rows])  # fmt: skip
        except QueueFull as e:
            LOG.info(json.dumps({"event": "refused", "status": 429}))
            if metrics is not None:
                metrics.refused.labels("429").inc()
            err = RequestError(str(e), code="queue_full", status=429, type="rate_limit_error")
            return error_response(err, {"Retry-After": str(e.retry_after_s)})
        except RequestError as e:
            LOG.info(json.dumps({"event": "refused", "status": e.status, "code": e.code}))
            if metrics is not None:
                metrics.refused.labels(str(e.status)).inc()
            return error_response(e)
        except ClientDisconnect:  # gone before its body arrived: one line, no traceback
            LOG.info(json.dumps({"event": "disconnected", "while": "reading the body"}))
            return Response(status_code=499)  # nobody will read it
        shape = Shape(req, rid, limits.model_name, tokenizer)
        # How many of the oldest messages a truncate request left out (the page shows it).
        dropped = {"X-Dropped-Messages": str(req.dropped_messages)} if req.dropped_messages else {}
        if req.stream:
            body = sse(events, handles, shape, req)
            headers = {"Cache-Control": "no-cache", **dropped}
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        response = await whole(request, events, handles, shape)
        if dropped and isinstance(response, dict):
            response = JSONResponse(response, headers=dropped)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except RequestError as e:
            return error_response(e)
        card = _model_card(limits.model_name, created, limits.max_seq_len)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        try:
            check_key(request)
            if model_id != limits.model_name:
                raise RequestError(f"the model {model_id!r} does not exist", param="model",
                                   code="model_not_found", status=404)  # fmt: skip
        except RequestError as e:
            return error_response(e)
        return _model_card(limits.model_name, created, limits.max_seq_len)

    if metrics is not None:

        @app.get("/metrics")
        async def metrics_text():  # no key: like /health, it holds no prompt or answer
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: for uptime checkers
    async def health():
        return {"status": "ok", **scheduler.load()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


class _Mailbox:
    """Hands the scheduler thread's events to the event loop with at most one wake-up per
    batch: every token of every stream waking the loop would make the two threads trade
    the GIL (and the CPU) once per token per stream."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, event: Any) -> None:  # any thread
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _deliver(self) -> None:  # the event loop
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def _too_big(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than {limit} bytes",
                        code="body_too_large", status=413)  # fmt: skip


def _model_card(name: str, created: int, context: int) -> dict[str, Any]:
    """OpenAI's model object plus the context length (vLLM's and llama.cpp's names)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "tritonlm",
            "max_model_len": context, "context_length": context}  # fmt: skip
