"""Multiple-choice task files: HellaSwag, ARC, MMLU and a plain format, read from JSONL.

Every format becomes the same `Item`: a context, the choice strings and the gold index,
built the way lm-evaluation-harness builds its prompts, so that our acc and acc_norm
can be compared with the harness's on the same items:

    format     fields (one JSON object per line)         context / choices
    hellaswag  ctx (or ctx_a + ctx_b), endings, label     "{activity_label}: {ctx}" / endings,
               optional activity_label                    both cleaned as the harness does
    arc        question, choices {text, label},           "Question: {question}\\nAnswer:" /
               answerKey                                  choices.text
    mmlu       question, choices (list), answer (index    "{question}\\nA. ..\\nB. ..\\nAnswer:" /
               or letter), optional subject               the letters "A", "B", ...
    plain      context, choices, answer (index or the    context / choices
               text of the right choice)

The continuation scored for a choice is the target delimiter " " followed by the choice.
Every problem with a file is a `TaskError` whose message starts with "path:line:".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.data_files import DataError, read_lines

FORMATS = ("hellaswag", "arc", "mmlu", "plain")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskError(DataError):
    """A task file that cannot be read as multiple-choice items (message names path:line)."""


@dataclass(frozen=True)
class Item:
    """One question: the text before the answer, the answer options, the right one.

    ``description`` is text the harness puts before any few-shot examples (MMLU's subject
    line); ``line`` is where the item sits in its file, for messages.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    description: str = ""
    line: int = 0


# ----------------------------------------------------------------------------- detection


def detect_format(record: dict) -> str | None:
    """The format whose telltale keys ``record`` has, or None.

    >>> detect_format({"ctx": "A man", "endings": ["a", "b"], "label": 0})
    'hellaswag'
    """
    if "endings" in record:
        return "hellaswag"
    if "answerKey" in record:
        return "arc"
    if "context" in record:
        return "plain"
    if "question" in record and "answer" in record:
        return "mmlu"
    return None


# ----------------------------------------------------------------------------- per format


def _hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag cleanup: strip, WikiHow '[title]' -> '. ', drop other
    [bracketed] markers, collapse one double space."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> Item:
    if "ctx_a" in r and "ctx_b" in r:  # the dataset's own split: the harness capitalizes ctx_b
        ctx = _string(r, "ctx_a") + " " + _string(r, "ctx_b").capitalize()
    else:
        ctx = _string(r, "ctx")
    label = r.get("activity_label")
    if label is not None:
        ctx = _string(r, "activity_label") + ": " + ctx
    endings = [_hellaswag_clean(e) for e in _strings(r, "endings")]
    return Item(_hellaswag_clean(ctx), tuple(endings), _index(r, "label", len(endings)))


def _arc(r: dict) -> Item:
    choices = r.get("choices")
    if not isinstance(choices, dict):
        raise TaskError('"choices" must be an object with "text" and "label" lists')
    texts, labels = _strings(choices, "text"), _strings(choices, "label")
    if len(texts) != len(labels):
        raise TaskError(f'"choices" has {len(texts)} texts but {len(labels)} labels')
    key = r.get("answerKey")
    if key not in labels:
        raise TaskError(f'"answerKey" {key!r} is not one of the labels {labels}')
    return Item(f"Question: {_string(r, 'question')}\nAnswer:", tuple(texts), labels.index(key))


def _mmlu(r: dict) -> Item:
    options = _strings(r, "choices")
    if len(options) > len(LETTERS):
        raise TaskError(f"more than {len(LETTERS)} choices")
    letters = LETTERS[: len(options)]
    lines = [_string(r, "question").strip()]
    lines += [f"{letter}. {text}" for letter, text in zip(letters, options, strict=True)]
    answer = r.get("answer")
    if isinstance(answer, str) and answer in letters and answer:
        gold = letters.index(answer)
    else:
        gold = _index(r, "answer", len(options))
    subject = r.get("subject")
    about = ""
    if isinstance(subject, str) and subject.strip():
        topic = subject.replace("_", " ").strip()
        about = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    return Item("\n".join(lines) + "\nAnswer:", tuple(letters), gold, about)


def _plain(r: dict) -> Item:
    choices = _strings(r, "choices")
    answer = r.get("answer")
    if isinstance(answer, str):
        if answer not in choices:
            raise TaskError(f'"answer" {answer!r} is not one of the choices')
        gold = choices.index(answer)
    else:
        gold = _index(r, "answer", len(choices))
    return Item(_string(r, "context"), tuple(choices), gold)


_BUILDERS = {"hellaswag": _hellaswag, "arc": _arc, "mmlu": _mmlu, "plain": _plain}


# ----------------------------------------------------------------------------- field checks


def _string(r: dict, key: str) -> str:
    value = r.get(key)
    if not isinstance(value, str):
        raise TaskError(f'"{key}" must be a string' + ("" if key in r else " (missing)"))
    return value


def _strings(r: dict, key: str) -> list[str]:
    value = r.get(key)
    if not isinstance(value, list) or len(value) < 2:
        raise TaskError(f'"{key}" must be a list of at least two strings')
    if not all(isinstance(v, str) for v in value):
        raise TaskError(f'"{key}" must hold strings only')
    return value


def _index(r: dict, key: str, n: int) -> int:
    """An answer index given as an int or a decimal string ("2"), within 0..n-1."""
    value = r.get(key)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise TaskError(f'"{key}" must be an index in 0..{n - 1}, got {value!r}')
    return value


# ----------------------------------------------------------------------------- loading


def load_task(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, list[Item]]:
    """Read a JSONL task file; return (format, items). ``fmt`` None: detect it from the
    first record, and every later record must be of the same format."""
    file = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise TaskError(f"unknown task format {fmt!r} (expected one of {', '.join(FORMATS)})")
    items: list[Item] = []
    for line, raw in read_lines(file):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise TaskError(f"{file}:{line}: not valid JSON ({msg})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{file}:{line}: expected a JSON object")
        found = detect_format(record)
        if fmt is None:
            if found is None:
                keys = ", ".join(sorted(record)[:6]) or "none"
                raise TaskError(f"{file}:{line}: cannot tell the task format from the keys "
                                f"({keys}); use `format`")  # fmt: skip
            fmt = found
        try:
            item = _BUILDERS[fmt](record)
            if any(not c.strip() for c in item.choices):  # acc_norm divides by the length
                raise TaskError("a choice is empty")
        except TaskError as e:
            raise TaskError(f"{file}:{line}: {fmt} item: {e}") from None
        items.append(Item(item.context, item.choices, item.gold, item.description, line))
    if not items:
        raise TaskError(f"{file}: no task items found")
    return fmt, items
