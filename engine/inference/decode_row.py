"""The decoding state of one prompt, shared by :mod:`.generate` (one batch, start to end) and
:mod:`.scheduler` (rows that join and leave a running batch): the token and text it has
produced, and the rule that ends it (generate.py's stop-reason table, in that order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from .sampling import SamplingConfig
from .text_stream import TextStream

__all__ = ["DecodeRow", "GenerationResult", "Piece", "StopRules", "default_stop_ids"]


# ----------------------------------------------------------------------------- results


@dataclass
class Piece:
    """One generated token and the text it released (possibly "", e.g. half a character,
    a possible stop-string prefix, or the stop token itself). Joining every piece's text
    gives the result's text."""

    token_id: int
    text: str


@dataclass
class GenerationResult:
    """What one prompt produced, with counts and timings.

    token_ids       every generated token, including a final <|eos|> / <|end|>
    new_tokens      len(token_ids)
    prompt_tokens   tokens the model actually read (after truncation)
    prompt_truncated  tokens dropped from the start of a too-long prompt (0 if none)
    time_to_first_token_s  from the call to the first sampled token (prefill + 1 sample)
    tokens_per_s    new_tokens / elapsed_s (end to end, prefill included)
    decode_tokens_per_s  (new_tokens - 1) / (elapsed_s - time_to_first_token_s): the
                    speed of the one-token-per-step phase (0 when only one token)
    step_logits     with keep_logits=True: the raw logits [V] (float32, CPU) each token
                    was sampled from
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    stop_reason: str = ""
    prompt_truncated: int = 0
    warnings: list[str] = field(default_factory=list)
    time_to_first_token_s: float = 0.0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    step_logits: list[torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no logits)."""
        d = asdict(self)
        d.pop("step_logits")
        return d


class DecodeRow:
    """Decoding state of one prompt."""

    def __init__(self, prompt: list[int], config: SamplingConfig, tokenizer, keep_logits: bool):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.text = TextStream(config.stop) if tokenizer is not None else None
        self.result = GenerationResult(
            prompt_tokens=len(prompt), step_logits=[] if keep_logits else None
        )
        self.done = False

    def accept(self, tok: int, n_new: int, rules: StopRules) -> tuple[str, bool]:
        """Take this row's ``n_new``-th token; return the text it releases and whether the
        row is now finished (the stop reasons of generate.py's table, in that order)."""
        self.result.token_ids.append(tok)
        text = ""
        reason = rules.stop_ids.get(tok)
        if reason is None and self.text is not None:
            text = self.text.push(self.tokenizer.decode_bytes([tok]))
            if self.text.stopped:
                reason = "stop_string"
        if reason is None and n_new >= rules.max_new_tokens:
            reason = "max_new_tokens"
        if reason is None and len(self.prompt) + n_new > rules.max_len:
            reason = "context"  # max_seq_len tokens read: no room to feed it
        if reason is None:
            return text, False
        return text + self.finish(reason), True

    def finish(self, reason: str) -> str:
        """Mark as done; return the text still held back that is now released."""
        self.done = True
        self.result.stop_reason = reason
        if self.text is None:
            return ""
        tail = self.text.flush() if reason != "interrupted" else ""
        self.result.text = self.text.text
        return tail


class StopRules(NamedTuple):
    """When a row stops, besides a stop string (which its TextStream finds)."""

    stop_ids: dict[int, str]  # token id -> stop reason ("eos" or "end")
    max_new_tokens: int
    max_len: int  # the model's context, max_seq_len


def default_stop_ids(tokenizer, stop_token_ids) -> dict[int, str]:
    """Token id -> stop reason: the given ids ("eos"), else the tokenizer's control tokens."""
    if stop_token_ids is not None:
        return {int(t): "eos" for t in stop_token_ids}
    if tokenizer is None:
        return {}
    # Any control token ends the answer: <|eos|> the document, <|end|> (or an imported
    # <|im_end|>) the turn, and a role marker or <|bos|>/<|pad|> would start something that
    # is not the answer. The tokenizer knows which of its special tokens those are.
    eos = tokenizer.eos_id
    return {int(t): "eos" if t == eos else "end" for t in tokenizer.stop_ids()}
