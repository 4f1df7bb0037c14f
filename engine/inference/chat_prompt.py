"""Prompt ids for generation: a plain-text continuation, or a chat history that fits.

``encode_raw_prompt(tok, "Once")`` is ``[<|bos|>, *tok.encode("Once")]``;
``build_chat_prompt(tok, messages, max_tokens).ids`` is the chat template of the most
recent messages that fit in ``max_tokens``, ending with ``<|assistant|>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingError

__all__ = ["ChatPrompt", "build_chat_prompt", "encode_raw_prompt", "history_budget"]


def encode_raw_prompt(tokenizer, text: str) -> list[int]:
    """Plain-text continuation prompt: <|bos|> + text (pretraining documents look like this);
    an imported tokenizer whose original adds no bos token gives just the text."""
    bos = tokenizer.bos_id
    return [*([bos] if bos is not None else []), *tokenizer.encode(text)]


@dataclass
class ChatPrompt:
    """Prompt ids for a chat history; ``dropped`` = messages left out to fit the context,
    ``cut_tokens`` = tokens cut from the start of a last message that alone was too long."""

    ids: list[int]
    dropped: int
    messages: list[dict[str, str]]
    cut_tokens: int = 0  # oldest tokens cut from a last message longer than the context


def history_budget(context: int, max_new_tokens: int) -> int:
    """Tokens a shortened history may take: the context less room to answer (the answer's
    length, at most a quarter of the context). llm-chat and llm-serve's ``truncate`` agree.

    >>> history_budget(256, 128), history_budget(256, 16), history_budget(2, 8)
    (192, 240, 1)
    """
    return context - min(max_new_tokens, max(1, context // 4))


def build_chat_prompt(tokenizer, messages: list[dict[str, str]], max_tokens: int) -> ChatPrompt:
    """Render ``messages`` with the chat template, ending with <|assistant|>.

    When the ids exceed ``max_tokens``, the oldest turns are dropped (system messages are
    kept), one message at a time, until it fits and the history starts with a user turn.
    If even the last message alone is too long, its oldest content tokens are cut
    (``cut_tokens``) so that the template around it (<|bos|>, system, <|user|>, <|end|>,
    <|assistant|>) survives and there is room to answer.
    """
    if max_tokens < 1:
        raise SettingError(f"max_tokens must be >= 1, got {max_tokens}")
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while True:
        kept = system + turns
        ids, _ = tokenizer.render_chat(kept, add_generation_prompt=True)
        if len(ids) > max_tokens and len(turns) == 1:
            return _cut_last_message(tokenizer, system, turns[0], max_tokens, dropped)
        if len(ids) <= max_tokens or len(turns) <= 1:
            return ChatPrompt(ids=list(ids), dropped=dropped, messages=kept)
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
            dropped += 1


def _cut_last_message(tokenizer, system, last, max_tokens: int, dropped: int) -> ChatPrompt:
    """The template with ``last``'s content reduced to its most recent tokens."""
    frame, _ = tokenizer.render_chat([*system, {**last, "content": ""}], add_generation_prompt=True)
    content = tokenizer.encode(last["content"])
    keep = max_tokens - len(frame)
    if keep < 1:  # the system prompt alone fills the context: the generator truncates
        ids, _ = tokenizer.render_chat([*system, last], add_generation_prompt=True)
        return ChatPrompt(ids=list(ids), dropped=dropped, messages=[*system, last])
    tail = tokenizer.chat_tail_length()  # <|end|> <|assistant|> in our template
    ids = frame[:-tail] + content[-keep:] + frame[-tail:]
    return ChatPrompt(
        ids=ids, dropped=dropped, messages=[*system, last], cut_tokens=len(content) - keep
    )
