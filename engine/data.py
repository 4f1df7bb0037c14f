"""Datasets: pretraining texts and chat conversations, loaded from files with clear errors.

Formats (chosen by file extension; a folder is searched recursively):

    pretraining texts                      chats
    .txt    the whole file is one document  -
    .json   a list of strings               a list of flat strings "User: ... Assistant: ..."
    .jsonl  one {"text": "..."} per line    one {"messages": [{"role", "content"}, ...]} per line
    .csv    no header; each row is one text -
            (its non-empty cells, stripped, joined with one space)

Every problem with the structure of a file is a `DataError` whose message starts with
"path:line:" (for example "data/x.jsonl:17: not valid JSON (...)"). Items that are merely
empty (empty or whitespace-only strings, blank JSONL lines, empty CSV rows) are skipped, and
every skip is counted in `LoadResult.skipped` under its reason, so nothing vanishes unseen.
If no usable item is left across all the given paths, that is a `DataError` too.
Paths are checked before anything is read (engine/data_files.py): only regular files are
opened, and a file reached twice is read once (counted as "duplicate path"). A .json list
is parsed as a stream (engine/json_list.py), so memory holds the items, not the text too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .data_files import DataError, PathWalker, read_lines, read_text
from .json_list import json_list_items

__all__ = ["DataError", "LoadResult", "check_chat", "load_chats", "load_texts", "parse_flat_chat"]

ROLES = ("system", "user", "assistant")
TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv")
CHAT_EXTENSIONS = (".json", ".jsonl")

PathLike = str | os.PathLike


@dataclass
class LoadResult:
    """What a loader found: the usable items, what it skipped and why, the files it read.

    `examples` keeps the first path skipped for a path-level reason ("duplicate path",
    "unreadable folder", ...), so the summary can say which one.
    """

    items: list
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1, example: object = None) -> None:
        """Count `count` skipped items under `reason` (`example`: the first path, if any)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        if example is not None:
            self.examples.setdefault(reason, str(example))

    def summary(self, kind: str) -> str:
        """'2576 documents from 1 file (skipped: 3 empty text)': nothing dropped silently."""
        files = len(self.sources)
        line = f"{len(self.items)} {kind} from {files} file{'s' if files != 1 else ''}"
        detail = _fmt_skipped(self.skipped, self.examples)
        return line + (f" (skipped: {detail})" if self.skipped else "")


# ----------------------------------------------------------------------------- public API


def load_texts(paths: PathLike | Iterable[PathLike], option: str | None = None) -> LoadResult:
    """Load pretraining documents (`list[str]`) from files and folders, in the given order.

    `option` (e.g. "--data") starts every error message, so a command line's error says
    which of its options holds the bad path.

    >>> load_texts(["notes.txt", "more.json"]).items    # doctest: +SKIP
    ['whole text of notes.txt', 'first string of more.json', ...]
    """
    readers = {".txt": _texts_txt, ".json": _texts_json, ".jsonl": _texts_jsonl, ".csv": _texts_csv}
    return _load(paths, readers, "texts", option)


def load_chats(paths: PathLike | Iterable[PathLike], option: str | None = None) -> LoadResult:
    """Load conversations (`list[list[{"role", "content"}]]`) from .json and .jsonl files.

    Each conversation passes `check_chat`: known roles, non-empty contents, an optional
    system message only at the start, and at least one assistant turn.
    """
    readers = {".json": _chats_json, ".jsonl": _chats_jsonl}
    return _load(paths, readers, "chats", option)


_MARKER = re.compile(r"(?:^|(?<=\s))(System|User|Assistant):")


def parse_flat_chat(text: str) -> list[dict[str, str]]:
    """Split a flat chat string at its role markers into messages (contents stripped).

    >>> parse_flat_chat("User: Hi there. Assistant: Hello! User: Bye. Assistant: Bye.")
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': 'Hi there.'}, {'role': 'assistant', 'content': 'Hello!'},
     {'role': 'user', 'content': 'Bye.'}, {'role': 'assistant', 'content': 'Bye.'}]

    Markers are "System:", "User:" and "Assistant:" (capitalized) at the start of the text
    or after whitespace. The text must begin with a marker. This only parses; use
    `check_chat` to validate the result (for example that an assistant turn exists).
    """
    matches = list(_MARKER.finditer(text))
    if not matches or text[: matches[0].start()].strip():
        raise DataError("chat text must start with 'User:', 'Assistant:' or 'System:'")
    messages = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        messages.append({"role": m.group(1).lower(), "content": text[m.end() : end].strip()})
    return messages


def check_chat(messages: object) -> list[dict[str, str]]:
    """Validate one conversation and return it as plain {"role", "content"} dicts.

    Raises `DataError` (without a location; loaders add it) for: not a non-empty list,
    a message that is not an object with string "role" and "content", an unknown role,
    empty content, a system message anywhere but first, or no assistant turn at all.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"message {i} is {_kind(msg)}, expected an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise DataError(f"message {i} content is {_kind(content)}, expected a string")
        if not content.strip():
            raise DataError(f"message {i} ({role}) has empty content")
        if _SURROGATE.search(content):
            raise DataError(f"message {i} ({role}) {_SURROGATE_MSG}")
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a system message may only come first")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError("conversation has no assistant turn")
    return clean


# ----------------------------------------------------------------------------- walking paths


def _load(paths, readers: dict, what: str, option: str | None) -> LoadResult:
    """Check and expand every path first (so a bad one fails fast), then read each file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError(f"no input paths given for {what}")
    try:
        result = LoadResult(items=[])
        walker = PathWalker(tuple(readers), lambda reason, path: result.skip(reason, 1, path))
        for path in paths:
            walker.add(path)
        for file in walker.files:
            result.sources.append(str(file))
            readers[file.suffix.lower()](file, result)
        if not result.items:
            names = ", ".join(str(p) for p in paths)
            skipped = _fmt_skipped(result.skipped, result.examples)
            detail = f" (skipped: {skipped})" if result.skipped else ""
            raise DataError(f"{names}: no usable {what} found{detail}")
    except DataError as e:
        if option:
            raise DataError(f"{option} {e}") from None
        raise
    return result


# ----------------------------------------------------------------------------- readers


def _texts_txt(file: Path, result: LoadResult) -> None:
    text = read_text(file)
    if text.strip():
        result.items.append(text)
    else:
        result.skip("empty text")


def _texts_json(file: Path, result: LoadResult) -> None:
    items, surrogate = result.items, _SURROGATE.search  # the hot loop of a big corpus
    for line, value in json_list_items(file):
        if type(value) is not str:
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        if surrogate(value):
            raise DataError(f"{file}:{line}: text {_SURROGATE_MSG}")
        if value and not value.isspace():
            items.append(value)
        else:
            result.skip("empty text")


def _texts_jsonl(file: Path, result: LoadResult) -> None:
    for line, record in _jsonl_records(file, result):
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f'{file}:{line}: expected an object with a string "text" field')
        _add_text(file, line, value, result)


def _texts_csv(file: Path, result: LoadResult) -> None:
    # strict: an unclosed quote would otherwise swallow the rest of the file into one cell
    reader = csv.reader(io.StringIO(read_text(file), newline=""), strict=True)
    line = 1
    try:
        for row in reader:
            joined = " ".join(cell.strip() for cell in row if cell.strip())
            if joined:
                result.items.append(joined)
            else:
                result.skip("empty row")
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{file}:{line}: bad CSV row ({e})") from e


def _chats_json(file: Path, result: LoadResult) -> None:
    for line, value in json_list_items(file):
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        if not value.strip():
            result.skip("empty chat")
            continue
        try:
            result.items.append(check_chat(parse_flat_chat(value)))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None


def _chats_jsonl(file: Path, result: LoadResult) -> None:
    for line, record in _jsonl_records(file, result):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{file}:{line}: expected an object with a "messages" list')
        try:
            result.items.append(check_chat(record["messages"]))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None


# ----------------------------------------------------------------------------- JSON helpers

# A \ud800-\udfff escape decodes to half of a UTF-16 pair: not text, and unencodable later.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_MSG = "holds an unpaired surrogate (a \\ud800-\\udfff escape), which is not text"


def _add_text(file: Path, line: int, value: str, result: LoadResult) -> None:
    if _SURROGATE.search(value):
        raise DataError(f"{file}:{line}: text {_SURROGATE_MSG}")
    if value.strip():
        result.items.append(value)
    else:
        result.skip("empty text")


def _jsonl_records(file: Path, result: LoadResult):
    """Yield (line, parsed value) for each non-blank line; blank lines are counted."""
    for line, raw in read_lines(file):
        if not raw.strip():
            result.skip("blank line")
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{line}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{file}:{line}: JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer with more digits than Python allows
            raise DataError(f"{file}:{line}: not valid JSON ({str(e).split(';')[0]})") from None


def _kind(value: object) -> str:
    """A JSON-flavoured name for the type of `value`, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "a number", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _fmt_skipped(skipped: dict[str, int], examples: dict[str, str] | None = None) -> str:
    """'1 duplicate path [a.json], 3 empty text': counts, with the first path where known."""
    parts = []
    for reason, n in sorted(skipped.items()):
        example = (examples or {}).get(reason)
        where = f" [{example}{', ...' if n > 1 else ''}]" if example else ""
        parts.append(f"{n} {reason}{where}")
    return ", ".join(parts)
