"""llm-serve's answers: OpenAI's response objects for one request of one or more choices,
whole (one JSON) or streamed (server-sent events ending in ``[DONE]``).

A request's choices (n answers per prompt, a batch of prompts) are separate scheduler
rows; their events arrive on one queue as (choice index, event) and are shaped here.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from tritonlm.engine.inference.logprobs import chat_logprobs, completion_logprobs
from tritonlm.engine.inference.scheduler import Event, finish_reason
from tritonlm.engine.inference.serve_request import RequestError, ServeRequest

ENDS = ("eos", "end")  # stop reasons of a sampled stop token
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is there


def error_response(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def engine_error(message: str) -> RequestError:
    return RequestError(f"generation failed: {message}", status=500, type="server_error")


class Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, req: ServeRequest, rid: str, model: str, tokenizer):
        self.req, self.kind, self.id, self.model, self.tok = req, req.kind, rid, model, tokenizer
        self.prompt_tokens = sum(len(p) for p in req.prompts)
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # streamed completions: characters sent per choice

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _prompt_of(self, index: int) -> int:
        return index // self.req.n

    def _logprobs(self, index: int, entries: list, prompt_entries: list | None, text_at: int):
        """The choice's logprobs object for these entries, or None when not asked for."""
        if self.req.options.logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.tok)
        skip = 0
        if prompt_entries:
            skip = self.req.bos_added[self._prompt_of(index)]
            entries = [*prompt_entries, *entries]
        return completion_logprobs(entries, self.tok, skip_first=skip, offset=text_at)

    def _echo(self, index: int) -> str:
        return self.req.prompt_texts[self._prompt_of(index)] if self.req.echo else ""

    def _content_only(self, entries: list, result) -> list:
        """Chat logprobs cover the message's tokens: not the closing <|end|> / <|eos|>
        (completions report every sampled token, as scoring clients expect)."""
        if self.kind == "chat" and result is not None and result.stop_reason in ENDS:
            return entries[:-1]
        return entries

    def whole(self, answers: dict[int, Answer]) -> dict[str, Any]:
        choices = []
        for index in sorted(answers):
            a = answers[index]
            reason = finish_reason(a.result.stop_reason)
            entries = self._content_only(a.logprobs, a.result)
            lp = self._logprobs(index, entries, a.prompt_logprobs, 0)
            if self.kind == "chat":
                message = {"role": "assistant", "content": a.text}
                choices.append({"index": index, "message": message, "finish_reason": reason,
                                "logprobs": lp})  # fmt: skip
            else:
                choices.append({"index": index, "text": self._echo(index) + a.text,
                                "finish_reason": reason, "logprobs": lp})  # fmt: skip
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        done = sum(a.result.new_tokens for a in answers.values())
        return {**self._head(obj), "choices": choices, "usage": self.usage(done)}

    def role_chunk(self, index: int) -> dict[str, Any]:
        choice = {"index": index, "delta": {"role": "assistant"}, "finish_reason": None,
                  "logprobs": None}  # fmt: skip
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def chunk(self, index: int, event: Event | None, reason: str | None = None) -> dict:
        """A chunk of one choice: the event's text and logprobs, or only a finish reason."""
        text, lp = "", None
        if event is not None:
            text = event.text
            first = index not in self._offsets
            if self.kind != "chat" and first:
                text = self._echo(index) + text
            at = self._offsets.get(index, 0)
            entries = self._content_only(event.logprobs or [], event.result)
            lp = self._logprobs(index, entries, event.prompt_logprobs, at)
            self._offsets[index] = at + len(text)
        if self.kind == "chat":
            delta = {"content": text} if event is not None else {}
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": lp}
        return {**self._head("text_completion"), "choices": [choice]}

    def has_logprobs(self, event: Event) -> bool:
        """Whether the event carries entries this request reports (not a chat's <|end|>)."""
        entries = self._content_only(event.logprobs or [], event.result)
        return bool(entries or event.prompt_logprobs)

    def unsent_echo(self, index: int) -> bool:
        return self.req.echo and index not in self._offsets

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion_tokens)}


class Answer:
    """One choice as it arrives: its text, log-probability entries and final result."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.result = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, event: Event) -> None:
        self.parts.append(event.text)
        self.logprobs += event.logprobs or []
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.done:
            self.result = event.result


def cancel_all(handles) -> None:
    for handle in handles:
        handle.cancel()  # a no-op once finished; frees the row if the client went away


async def whole(request: Request, events: asyncio.Queue, handles, shape: Shape):
    """Wait for every choice; cancel them all if the client goes away meanwhile."""
    answers = {i: Answer() for i in range(len(handles))}
    left = len(handles)
    try:
        while left:
            try:
                index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody will read it
                continue
            if event.error is not None:
                return error_response(engine_error(event.error))
            answers[index].add(event)
            left -= event.done
    finally:
        cancel_all(handles)
    return shape.whole(answers)


def sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse(events: asyncio.Queue, handles, shape: Shape, req: ServeRequest):
    """Server-sent events: per choice, chunks of released text (and logprobs), then its
    finish reason; a usage chunk if asked; [DONE]. If the client disconnects, the response
    task is cancelled and so are the requests."""
    try:
        if shape.kind == "chat":  # the role comes first, as OpenAI's streams do
            for index in range(len(handles)):
                yield sse_line(shape.role_chunk(index))
        left, tokens = len(handles), 0
        while left:
            index, event = await events.get()
            if event.error is not None:
                yield sse_line(engine_error(event.error).body())
                break
            if event.text or shape.has_logprobs(event) or shape.unsent_echo(index):
                yield sse_line(shape.chunk(index, event))
            if event.done:
                left -= 1
                tokens += event.result.new_tokens
                yield sse_line(shape.chunk(index, None, finish_reason(event.result.stop_reason)))
        else:
            if req.include_usage:
                yield sse_line(shape.usage_chunk(tokens))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all(handles)
