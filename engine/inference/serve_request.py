"""An OpenAI-style request body -> prompt ids and sampling settings, or a clear error.

The server's front end only reads bytes and writes responses; every decision about a
request lives here, so tests can check it without HTTP:

    >>> req = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
    ...                      "max_tokens": 8, "temperature": 0}, "chat", tok, limits)
    >>> req.sampling.max_new_tokens, req.stream                          # doctest: +SKIP
    (8, False)

Rules: OpenAI's defaults (temperature 1, top_p 1, max_tokens up to the server's cap) and
ranges; the project's extra samplers under their own names (top_k, min_p,
repetition_penalty). Fields that would change the result but are not implemented (tools,
logit_bias, best_of, ...) and unknown fields are refused, never ignored. A prompt that
leaves no room to answer in the context is refused (code context_length_exceeded).

``n`` answers per prompt (completions also take a batch of prompts: strings or token-id
lists): choice ``i * n + j`` is answer j of prompt i; with a ``seed``, answer j samples with
seed + j, so ``n=3, seed=s`` gives the answers of three requests seeded s, s+1, s+2.
Log-probabilities: chat ``logprobs: true`` + ``top_logprobs`` (0..20); completions
``logprobs`` (0..5 alternatives) and ``echo`` (the prompt's tokens and their
log-probabilities come first). ``response_format`` json_object / json_schema is compiled
by the server's :class:`.grammar.Grammars` (a schema keyword it cannot enforce is a 400
naming it) and constrains every answer's tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import EngineError
from ..fields import MAX_SEED
from .chat_prompt import build_chat_prompt, encode_raw_prompt, history_budget
from .grammar import GrammarError, Grammars
from .logprobs import MAX_TOP_CHAT, MAX_TOP_COMPLETION
from .row_options import RowOptions
from .sampling import SamplingConfig

__all__ = ["Limits", "RequestError", "ServeRequest", "decode_body", "parse_request"]

MAX_STOP = 4  # as OpenAI: at most four stop strings
MAX_JSON_DEPTH = 32  # a request is an object of messages of parts: far less deep
MAX_N = 16  # answers per prompt (each takes a row)
MAX_PROMPTS = 64  # prompts in one completions batch
ROLES = ("system", "user", "assistant")
# Accepted and ignored: they do not change the tokens (or only ask for the default).
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Known OpenAI fields we do not implement: refused unless they ask for the default.
UNSUPPORTED = {
    "best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "suffix": (None, ""),
    "audio": None, "modalities": (None, ["text"]),
    "prediction": None, "reasoning_effort": None, "web_search_options": None,
}  # fmt: skip


class RequestError(EngineError, ValueError):
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
    prompt_ids: list[int]  # the (first) prompt
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    n: int = 1  # answers per prompt
    options: RowOptions = field(default_factory=RowOptions)  # logprobs, echo
    prompts: list[list[int]] = field(default_factory=list)  # every prompt (a batch)
    prompt_texts: list[str] = field(default_factory=list)  # what echo returns per prompt
    bos_added: list[int] = field(default_factory=list)  # 1 where the server put <|bos|> first
    echo: bool = False  # completions: the answer's text starts with the prompt's
    dropped_messages: int = 0  # oldest messages left out to fit (only with truncate: true)

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [self.prompt_ids]

    def rows(self) -> list[tuple[int, list[int], SamplingConfig]]:
        """(choice index, prompt, sampling) of every answer: prompt i's answer j is choice
        i * n + j and samples with seed + j (when seeded)."""
        out = []
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                cfg = self.sampling
                if j and cfg.seed is not None:
                    cfg = replace(cfg, seed=(cfg.seed + j) % (MAX_SEED + 1))
                out.append((i * self.n + j, prompt, cfg))
        return out


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body, or a RequestError (code invalid_json): not UTF-8,
    not JSON, or nested deeper than MAX_JSON_DEPTH (the decoder's own limit would end in
    a RecursionError, i.e. a 500, and deep values are costly to walk afterwards)."""
    too_deep = RequestError(f"the body is nested more than {MAX_JSON_DEPTH} levels deep",
                            code="invalid_json")  # fmt: skip
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:  # deeper is refused anyway: stop walking
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_request(body: Any, kind: str, tokenizer, limits: Limits,
                  grammars: Grammars | None = None) -> ServeRequest:  # fmt: skip
    """Validate a decoded JSON body for ``kind`` ("chat" or "completion"); ``grammars``
    compiles a response_format (without it, one that constrains is refused)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    prompt_field = "messages" if kind == "chat" else "prompt"
    known = {prompt_field, *_SAMPLING_FIELDS, "model", "stream", "stream_options", "n"}
    known |= {"truncate"}
    known |= {"max_tokens", "max_completion_tokens", "logprobs", "response_format"}
    known |= {"top_logprobs"} if kind == "chat" else {"echo"}
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
    truncate = _bool(body, "truncate", False)
    dropped = 0
    if kind == "chat":
        budget = history_budget(limits.max_seq_len, _max_tokens(body, limits)) if truncate else None
        ids, dropped = _chat_ids(body.get("messages"), tokenizer, limits, budget)
        prompts, texts, bos_added = [ids], [""], [0]
    elif truncate:
        raise RequestError("truncate applies to chat messages only", param="truncate")
    else:
        prompts, texts, bos_added = _completion_prompts(body.get("prompt"), tokenizer)
    for ids in prompts:
        if len(ids) > limits.max_seq_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is "
                               f"{limits.max_seq_len}", param=prompt_field,
                               code="context_length_exceeded")  # fmt: skip
    n = 1 if body.get("n") is None else _number("n", body["n"], 1, MAX_N, False, True)
    if len(prompts) * n > MAX_PROMPTS:
        raise RequestError(f"{len(prompts)} prompts x n={n} answers is more than "
                           f"{MAX_PROMPTS} in one request", param="n")  # fmt: skip
    options, echo = _logprob_options(body, kind)
    options = replace(options, grammar=_grammar(body.get("response_format"), grammars))
    return ServeRequest(kind, prompts[0], _sampling(body, limits), stream, include_usage, n=n,
                        options=options, prompts=prompts, prompt_texts=texts,
                        bos_added=bos_added, echo=echo, dropped_messages=dropped)  # fmt: skip


def _grammar(response_format: Any, grammars: Grammars | None):
    """The compiled grammar of a response_format, None for none or text."""
    if response_format is None or response_format == {"type": "text"}:
        return None
    if grammars is None:
        raise RequestError("response_format is not available on this server (it needs "
                           "xgrammar)", param="response_format",
                           code="unsupported_parameter")  # fmt: skip
    try:
        return grammars.compile(response_format)
    except GrammarError as e:
        raise RequestError(str(e), param=e.param, code="unsupported_schema"
                           if "unsupported" in str(e) else None) from None  # fmt: skip


def _logprob_options(body: dict, kind: str) -> tuple[RowOptions, bool]:
    """chat: logprobs (bool) + top_logprobs; completions: logprobs (int) + echo."""
    if kind == "chat":
        on = _bool(body, "logprobs", False)
        top = body.get("top_logprobs")
        if top is not None:
            top = _number("top_logprobs", top, 0, MAX_TOP_CHAT, False, True)
            if not on:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return RowOptions(logprobs=(top or 0) if on else None), False
    top = body.get("logprobs")
    if top is not None:
        top = _number("logprobs", top, 0, MAX_TOP_COMPLETION, False, True)
    echo = _bool(body, "echo", False)
    return RowOptions(logprobs=top, prompt_logprobs=echo and top is not None), echo


# ----------------------------------------------------------------------------- prompts


def _chat_ids(messages: Any, tokenizer, limits: Limits,
              budget: int | None) -> tuple[list[int], int]:  # fmt: skip
    """The prompt ids and how many of the oldest messages were dropped: none unless the
    client asked (``truncate``, then ``budget`` tokens at most, as llm-chat does)."""
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
    # Without truncate a history that does not fit is refused, never silently shortened.
    ids, _ = tokenizer.render_chat(clean, add_generation_prompt=True)
    if budget is not None and len(ids) > budget:
        chat = build_chat_prompt(tokenizer, clean, budget)
        if not chat.cut_tokens:  # the last message alone too long: refused below
            return list(chat.ids), chat.dropped
    if len(ids) > limits.max_seq_len:
        hint = "" if budget is not None else " (or send truncate: true to drop the oldest turns)"
        raise RequestError(f"the messages take {len(ids)} tokens; this model's context is "
                           f"{limits.max_seq_len}{hint}", param="messages",
                           code="context_length_exceeded")  # fmt: skip
    return list(ids), 0


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


def _completion_prompts(prompt: Any, tokenizer) -> tuple[list[list[int]], list[str], list[int]]:
    """(ids, text, whether <|bos|> was added) per prompt. A prompt is a string (the server
    puts <|bos|> first, as llm-chat's raw mode) or a list of token ids (taken as they are);
    a list of either is a batch."""
    if prompt is None:
        raise RequestError("prompt is required (a string)", param="prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
        raise RequestError(f"prompt must be a string, a list of token ids, or a list of 1.."
                           f"{MAX_PROMPTS} of either", param="prompt")  # fmt: skip
    ids, texts, added = [], [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids.append(encode_raw_prompt(tokenizer, p))
            texts.append(p)
            added.append(int(len(ids[-1]) > 0 and ids[-1][0] == tokenizer.bos_id))
        elif _is_ids(p) and p:
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise RequestError(f"prompt[{i}]: token id {bad[0]} is out of range "
                                   f"[0, {tokenizer.vocab_size})", param="prompt")  # fmt: skip
            ids.append(list(p))
            texts.append(tokenizer.decode(p))
            added.append(0)
        else:
            raise RequestError(f"prompt[{i}] must be a string or a non-empty list of token ids",
                               param="prompt")  # fmt: skip
        if not ids[-1]:
            raise RequestError(f"prompt[{i}] encodes to no tokens", param="prompt")
    return ids, texts, added


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)  # fmt: skip


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
    # OpenAI's temperature 1; top_p is SamplingConfig's default (1, as OpenAI's and llm-chat's)
    values: dict[str, Any] = {"temperature": 1.0}
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
