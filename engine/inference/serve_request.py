"""An OpenAI-style request body -> prompt ids and sampling settings, or a clear error.

The server's front end only reads bytes and writes responses; every decision about a
request lives here, so tests can check it without HTTP:

    >>> req = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
    ...                      "max_tokens": 8, "temperature": 0}, "chat", tok, limits)
    >>> req.sampling.max_new_tokens, req.stream                          # doctest: +SKIP
    (8, False)

Rules: OpenAI's defaults (temperature 1, top_p 1, max_tokens up to the server's cap) and
ranges; the project's extra samplers under their own names (top_k, min_p,
repetition_penalty). Fields that would change the result but are not implemented (n > 1,
tools, logit_bias, logprobs, ...) and unknown fields are refused, never ignored. A prompt
that leaves no room to answer in the context is refused (code context_length_exceeded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..fields import MAX_SEED
from .chat_prompt import encode_raw_prompt
from .sampling import SamplingConfig

__all__ = ["Limits", "RequestError", "ServeRequest", "parse_request"]

MAX_STOP = 4  # as OpenAI: at most four stop strings
ROLES = ("system", "user", "assistant")
# Accepted and ignored: they do not change the tokens (or only ask for the default).
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Known OpenAI fields we do not implement: refused unless they ask for the default.
UNSUPPORTED = {
    "n": 1, "best_of": 1, "logprobs": (None, False), "top_logprobs": (None, 0), "echo": False,
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}), "audio": None, "modalities": (None, ["text"]),
    "prediction": None, "reasoning_effort": None, "web_search_options": None,
}  # fmt: skip


class RequestError(ValueError):
    """A request the server refuses: OpenAI's error fields plus the HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type)  # fmt: skip

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What the server allows: its one model name, context, and answer length cap."""

    model_name: str
    max_seq_len: int
    max_tokens_cap: int


@dataclass
class ServeRequest:
    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage


def parse_request(body: Any, kind: str, tokenizer, limits: Limits) -> ServeRequest:
    """Validate a decoded JSON body for ``kind`` ("chat" or "completion")."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    prompt_field = "messages" if kind == "chat" else "prompt"
    known = {prompt_field, *_SAMPLING_FIELDS, "model", "stream", "stream_options"}
    known |= {"max_tokens", "max_completion_tokens"}
    for name, value in body.items():
        if name in UNSUPPORTED:
            allowed = UNSUPPORTED[name]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise RequestError(f"{name}={value!r} is not supported by this server",
                                   param=name, code="unsupported_parameter")  # fmt: skip
        elif name not in known and name not in HARMLESS:
            raise RequestError(f"unrecognized request argument: {name}", param=name,
                               code="unrecognized_argument")  # fmt: skip
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model is required and must be a string", param="model")
    if model != limits.model_name:
        raise RequestError(f"the model {model!r} does not exist; this server has "
                           f"{limits.model_name!r}", param="model", code="model_not_found",
                           status=404)  # fmt: skip
    stream = _bool(body, "stream", False)
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise RequestError("stream_options must be {\"include_usage\": bool} and needs "
                               "stream: true", param="stream_options")  # fmt: skip
        include_usage = _bool(opts, "include_usage", False)
    if kind == "chat":
        ids = _chat_ids(body.get("messages"), tokenizer, limits)
    else:
        ids = _completion_ids(body.get("prompt"), tokenizer)
    if len(ids) > limits.max_seq_len:
        raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is "
                           f"{limits.max_seq_len}", param=prompt_field,
                           code="context_length_exceeded")  # fmt: skip
    return ServeRequest(kind, ids, _sampling(body, limits), stream, include_usage)


# ----------------------------------------------------------------------------- prompts


def _chat_ids(messages: Any, tokenizer, limits: Limits) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object, got {_kind(m)}", param=where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(f"{where} has unsupported fields: {', '.join(sorted(extra))}",
                               param=where)  # fmt: skip
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got "
                               f"{m.get('role')!r}", param=f"{where}.role")  # fmt: skip
        clean.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    # One render: a history that does not fit is refused, never silently shortened (so
    # build_chat_prompt's dropping of old turns, which llm-chat uses, is not wanted here).
    ids, _ = tokenizer.render_chat(clean, add_generation_prompt=True)
    if len(ids) > limits.max_seq_len:
        raise RequestError(f"the messages take {len(ids)} tokens; this model's context is "
                           f"{limits.max_seq_len}", param="messages",
                           code="context_length_exceeded")  # fmt: skip
    return list(ids)


def _content(content: Any, where: str) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):  # fmt: skip
                raise RequestError(f"{where}: only text parts are supported", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)


def _completion_ids(prompt: Any, tokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (batches of prompts are not supported)",
                           param="prompt")  # fmt: skip
    return encode_raw_prompt(tokenizer, prompt)


# ----------------------------------------------------------------------------- sampling

# name -> (low, high, low_open, integer): OpenAI's ranges, the project's for the extras.
_SAMPLING_FIELDS = {
    "temperature": (0.0, 2.0, False, False),
    "top_p": (0.0, 1.0, True, False),
    "presence_penalty": (-2.0, 2.0, False, False),
    "frequency_penalty": (-2.0, 2.0, False, False),
    "top_k": (0, 1 << 31, False, True),
    "min_p": (0.0, 0.999999, False, False),
    "repetition_penalty": (0.0, 10.0, True, False),
    "seed": (0, MAX_SEED, False, True),
    "stop": None,
}


def _sampling(body: dict, limits: Limits) -> SamplingConfig:
    values: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's defaults
    for name, spec in _SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None or spec is None:
            continue
        lo, hi, lo_open, integer = spec
        values[name] = _number(name, value, lo, hi, lo_open, integer)
    values["stop"] = _stops(body.get("stop"))
    values["max_new_tokens"] = _max_tokens(body, limits)
    try:
        return SamplingConfig(**values)
    except ValueError as e:  # e.g. 0 < temperature < 1e-6, which overflows float32
        raise RequestError(str(e), param=str(e).split()[0]) from None


def _max_tokens(body: dict, limits: Limits) -> int:
    given = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if not given:
        return limits.max_tokens_cap
    name = given[0]
    n = _number(name, body[name], 1, math.inf, False, True)
    if len(given) == 2 and body["max_tokens"] != n:
        raise RequestError("max_tokens and max_completion_tokens disagree", param="max_tokens")
    if n > limits.max_tokens_cap:
        raise RequestError(f"{name}={n} is above this server's cap of "
                           f"{limits.max_tokens_cap}", param=name)  # fmt: skip
    return n


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}",
                           param="stop")  # fmt: skip
    return tuple(stops)


def _number(name: str, value: Any, lo, hi, lo_open: bool, integer: bool):
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        word = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {word}, got {_kind(value)}", param=name)
    if integer and not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    bad = (value <= lo if lo_open else value < lo) or value > hi or value != value
    if bad:
        left = "(" if lo_open else "["
        raise RequestError(f"{name} must be in {left}{lo}, {hi}], got {value!r}", param=name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {_kind(value)}", param=name)
    return value


def _kind(value: Any) -> str:
    """JSON's name for a Python value's type (for messages)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
