"""Per-token log-probabilities for the server: the model's own distribution, and OpenAI's
two shapes for them.

What a log-probability is here: ``log_softmax`` of the model's raw logits (float32),
before temperature, penalties, filters and any grammar mask, so a number is a property of
the model and the text, not of the sampling settings. It is the same number ``llm-eval``
sums to score a choice (:func:`tritonlm.engine.eval.text.score_rows`): a prompt's tokens
are scored here by the same kind of forward (:func:`prompt_logprobs`).

Shapes (:func:`chat_logprobs`, :func:`completion_logprobs`)::

    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}
    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}],
                  "text_offset": [...]}

The first token of an echoed prompt has no log-probability (nothing predicts it): None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "MAX_TOP_CHAT",
    "MAX_TOP_COMPLETION",
    "TokenLogprob",
    "chat_logprobs",
    "completion_logprobs",
    "prompt_logprobs",
    "step_logprobs",
]

MAX_TOP_CHAT = 20  # OpenAI's limits on the alternatives per token
MAX_TOP_COMPLETION = 5


@dataclass
class TokenLogprob:
    """One token, its log-probability (None: the first prompt token), and the ``top`` most
    likely tokens at that position as (id, log-probability), most likely first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]
                  ) -> list[TokenLogprob]:  # fmt: skip
    """Rows of ``logits`` [n, V] and the token picked in each [n] -> one entry per row, with
    ``tops[i]`` alternatives for row i. One host read for the whole batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1)
    k = max(tops, default=0)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], tokens.view(-1, 1)[:, :0])
    chosen, values, ids, picked = chosen.tolist(), values.tolist(), ids.tolist(), tokens.tolist()
    return [TokenLogprob(picked[i], chosen[i], list(zip(ids[i][: tops[i]], values[i][: tops[i]],
                                                         strict=True)))  # fmt: skip
            for i in range(len(picked))]  # fmt: skip


@torch.no_grad()
def prompt_logprobs(model, ids: list[int], top: int) -> list[TokenLogprob]:
    """The log-probability of every token of ``ids`` given the ones before it (the first
    gets None), with ``top`` alternatives: one causal forward over the prompt, the scoring
    path of llm-eval (no KV cache)."""
    device = model.output_weight.device
    entries = [TokenLogprob(ids[0], None)]
    if len(ids) < 2:
        return entries
    hidden = model.hidden_states(torch.tensor([ids[:-1]], dtype=torch.long, device=device))
    logits = model.project(hidden[0])
    targets = torch.tensor(ids[1:], dtype=torch.long, device=device)
    return entries + step_logprobs(logits, targets, [top] * len(targets))


# ----------------------------------------------------------------------------- shapes


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob], tokenizer) -> dict[str, Any]:
    """OpenAI's chat ``choices[i].logprobs``: one item per generated token."""

    def item(tid: int, lp: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(tid)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp,
                "bytes": list(raw)}  # fmt: skip

    content = [{**item(e.token_id, e.logprob),
                "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]  # fmt: skip
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], tokenizer, skip_first: int = 0,
                        offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """OpenAI's completions ``choices[i].logprobs``. The first ``skip_first`` entries (a
    ``<|bos|>`` the server put before a text prompt) take no characters of the text;
    ``text_offset`` counts characters of the returned text from ``offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}  # fmt: skip
    at = offset
    for i, e in enumerate(entries):
        text = _text(tokenizer, e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        top = None if e.logprob is None else {}
        for t, lp in e.top:
            top.setdefault(_text(tokenizer, t), lp)  # two ids may print alike: keep the best
        out["top_logprobs"].append(top)
        out["text_offset"].append(at)
        if i >= skip_first:
            at += len(text)
    return out
