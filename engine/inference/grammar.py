"""Constrained decoding for ``response_format``: JSON (any object) or a JSON schema, through
xgrammar (the grammar engine vLLM and SGLang use), applied as a token mask.

:class:`Grammars` is built once per tokenizer (xgrammar's view of the vocabulary: each id's
bytes; control tokens are stop tokens, which the grammar allows only once the JSON is
complete). :meth:`Grammars.compile` turns a request's ``response_format`` into a compiled
grammar, refusing with :class:`GrammarError` (naming the keyword) any schema keyword
outside :data:`SUPPORTED` — xgrammar ignores some keywords silently, and an ignored
constraint would give answers that do not validate. :class:`RowGrammar` is one row's
matcher: before each sample it masks every token that cannot continue valid output
(:meth:`RowGrammar.mask`), after it advances (:meth:`RowGrammar.accept`).

Whitespace is compact (``{"a": 1}``): free whitespace would let a sampled answer wander.
Two kinds of tokens are masked besides: those holding a control character (a byte below
0x20; strict JSON forbids them raw inside strings, which xgrammar's string rule lets
through) and those that are not whole UTF-8 on their own (xgrammar may accept a cut or
stray byte sequence, which would decode to U+FFFD). Characters the vocabulary only has as
pieces are therefore not written in a constrained answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EngineError

__all__ = [
    "SUPPORTED",
    "GrammarError",
    "Grammars",
    "ResponseGrammar",
    "RowGrammar",
    "schema_problem",
]

# Schema keywords whose meaning xgrammar enforces (anything else is refused, by name).
SUPPORTED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "const", "anyOf", "$ref", "$defs", "definitions", "minItems", "maxItems", "minLength",
    "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
})  # fmt: skip
_SUBSCHEMA = {"items", "additionalProperties"}  # one schema (or a bool)
_SUBSCHEMAS = {"anyOf", "prefixItems"}  # a list of schemas
_NAMED = {"properties", "$defs", "definitions"}  # name -> schema
_MAX_SCHEMA_CHARS = 64 * 1024


class GrammarError(EngineError, ValueError):
    """A response_format that cannot be enforced; ``param`` names the field."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def schema_problem(schema: Any, path: str = "schema") -> str | None:
    """The first thing in ``schema`` that is not enforced, as a message, or None.

    >>> schema_problem({"type": "object", "properties": {"a": {"not": {}}}})
    "unsupported JSON schema keyword 'not' at schema.properties.a"
    """
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{path} must be an object"
    for key, value in schema.items():
        if key not in SUPPORTED:
            return f"unsupported JSON schema keyword {key!r} at {path}"
        where = f"{path}.{key}"
        subs: list[tuple[str, Any]] = []
        if key in _SUBSCHEMA:
            subs = [(where, value)]
        elif key in _SUBSCHEMAS:
            if not isinstance(value, list):
                return f"{where} must be a list of schemas"
            subs = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif key in _NAMED:
            if not isinstance(value, dict):
                return f"{where} must be an object"
            subs = [(f"{where}.{name}", v) for name, v in value.items()]
        for sub_path, sub in subs:
            problem = schema_problem(sub, sub_path)
            if problem:
                return problem
    return None


@dataclass(frozen=True)
class ResponseGrammar:
    """A compiled response format: xgrammar's grammar and the tokens never allowed [V]."""

    compiled: Any
    banned: torch.Tensor


def _whole_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Grammars:
    """Compiles response formats for one tokenizer and model vocabulary (thread-safe:
    the server's request handlers compile, the scheduler thread matches)."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
        except ImportError:
            raise GrammarError("response_format needs xgrammar on the server "
                               "(pip install 'tritonlm[serve]')") from None  # fmt: skip
        self.xgr = xgrammar
        stops = list(tokenizer.stop_ids())
        # Control tokens get no bytes: only the grammar's end (a stop token) may pick them.
        specials = set(stops) | set(getattr(tokenizer, "special_tokens", {}).values())
        vocab = [b"" if i in specials else tokenizer.token_bytes(i)
                 for i in range(tokenizer.vocab_size)]  # fmt: skip
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=stops)  # fmt: skip
        self.vocab_size = vocab_size
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.banned = torch.zeros(vocab_size, dtype=torch.bool)
        for i, raw in enumerate(vocab):
            self.banned[i] = any(b < 0x20 for b in raw) or not _whole_utf8(raw)

    def compile(self, response_format: Any):
        """A compiled grammar for ``{"type": "json_object"}`` or ``{"type": "json_schema",
        "json_schema": {"name", "schema", "strict"?, "description"?}}``; None for text."""
        if not isinstance(response_format, dict) or "type" not in response_format:
            raise GrammarError("response_format must be an object with a type")
        kind = response_format["type"]
        extra = set(response_format) - {"type", "json_schema"}
        if extra:
            raise GrammarError(f"response_format has unknown fields: {', '.join(sorted(extra))}")
        if kind == "text":
            return None
        if kind == "json_object":
            return self._compile({"type": "object"})
        if kind != "json_schema":
            raise GrammarError(f"response_format.type must be text, json_object or json_schema, "
                               f"got {kind!r}", param="response_format.type")  # fmt: skip
        spec = response_format.get("json_schema")
        where = "response_format.json_schema"
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GrammarError(f"{where} must be an object with a schema", param=where)
        unknown = set(spec) - {"name", "schema", "strict", "description"}
        if unknown:
            raise GrammarError(f"{where} has unknown fields: {', '.join(sorted(unknown))}",
                               param=where)  # fmt: skip
        problem = schema_problem(spec["schema"])
        if problem:
            raise GrammarError(problem, param=f"{where}.schema")
        return self._compile(spec["schema"])

    def _compile(self, schema: dict):
        text = json.dumps(schema)
        if len(text) > _MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is longer than {_MAX_SCHEMA_CHARS} characters")
        try:
            compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
        except Exception as e:  # xgrammar's own refusal (a bad $ref, a bad pattern, ...)
            raise GrammarError(f"the schema cannot be compiled: {e}") from None
        return ResponseGrammar(compiled, self.banned)


class RowGrammar:
    """One row's grammar state: mask the next token's logits, accept the sampled token."""

    def __init__(self, grammar: ResponseGrammar, vocab_size: int):
        import xgrammar  # present: a compiled grammar came from it

        self.xgr = xgrammar
        self.matcher = xgrammar.GrammarMatcher(grammar.compiled)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.banned = grammar.banned

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of logits [1, V] with every token the grammar forbids at -inf."""
        out = logits.float().clone()
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(out, self.bitmask.to(out.device))
        if self.banned.device != out.device:
            self.banned = self.banned.to(out.device)
        out[:, : len(self.banned)].masked_fill_(self.banned, float("-inf"))
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} does not continue the grammar")
