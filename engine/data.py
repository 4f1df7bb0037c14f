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
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv")
CHAT_EXTENSIONS = (".json", ".jsonl")

PathLike = str | os.PathLike


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the line or row."""


@dataclass
class LoadResult:
    """What a loader found: the usable items, what it skipped and why, the files it read."""

    items: list
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        """Count `count` skipped items under `reason`."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def summary(self, kind: str) -> str:
        """'2576 documents from 1 file (skipped: 3 empty text)': nothing dropped silently."""
        files = len(self.sources)
        line = f"{len(self.items)} {kind} from {files} file{'s' if files != 1 else ''}"
        return line + (f" (skipped: {_fmt_skipped(self.skipped)})" if self.skipped else "")


# ----------------------------------------------------------------------------- public API


def load_texts(paths: PathLike | Iterable[PathLike]) -> LoadResult:
    """Load pretraining documents (`list[str]`) from files and folders, in the given order.

    >>> load_texts(["notes.txt", "more.json"]).items    # doctest: +SKIP
    ['whole text of notes.txt', 'first string of more.json', ...]
    """
    readers = {".txt": _texts_txt, ".json": _texts_json, ".jsonl": _texts_jsonl, ".csv": _texts_csv}
    return _load(paths, readers, "texts")


def load_chats(paths: PathLike | Iterable[PathLike]) -> LoadResult:
    """Load conversations (`list[list[{"role", "content"}]]`) from .json and .jsonl files.

    Each conversation passes `check_chat`: known roles, non-empty contents, an optional
    system message only at the start, and at least one assistant turn.
    """
    readers = {".json": _chats_json, ".jsonl": _chats_jsonl}
    return _load(paths, readers, "chats")


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
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a system message may only come first")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError("conversation has no assistant turn")
    return clean


# ----------------------------------------------------------------------------- walking paths


def _load(paths, readers: dict, what: str) -> LoadResult:
    """Read every file under `paths` with the reader for its extension."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError(f"no input paths given for {what}")
    result = LoadResult(items=[])
    for path in paths:
        for file in _expand(path, tuple(readers), result):
            result.sources.append(str(file))
            readers[file.suffix.lower()](file, _read_text(file), result)
    if not result.items:
        names = ", ".join(str(p) for p in paths)
        detail = f" (skipped: {_fmt_skipped(result.skipped)})" if result.skipped else ""
        raise DataError(f"{names}: no usable {what} found{detail}")
    return result


def _expand(path: Path, extensions: tuple[str, ...], result: LoadResult) -> list[Path]:
    """A file stands for itself; a folder for its supported files, recursively.

    Folder contents are sorted by their relative path parts, so the order never depends on
    the file system. Files there with other extensions are counted as skipped. Hidden files
    and folders (names starting with ".") are not data: a run directory inside the corpus
    keeps its token cache in ``.cache``, which must never be read back as text.
    """
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).parts,
        )
        keep = [p for p in files if p.suffix.lower() in extensions]
        if len(keep) < len(files):
            result.skip("file with unsupported extension in folder", len(files) - len(keep))
        return keep
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() not in extensions:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r} "
            f"(expected one of {', '.join(extensions)})"
        )
    return [path]


def _read_text(file: Path) -> str:
    """The file's text as strict UTF-8 (a leading byte-order mark is dropped)."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror or e})") from e
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{file}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from e


# ----------------------------------------------------------------------------- readers


def _texts_txt(file: Path, text: str, result: LoadResult) -> None:
    if text.strip():
        result.items.append(text)
    else:
        result.skip("empty text")


def _texts_json(file: Path, text: str, result: LoadResult) -> None:
    for line, value in _json_list(file, text):
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        _add_text(value, result)


def _texts_jsonl(file: Path, text: str, result: LoadResult) -> None:
    for line, record in _jsonl_records(file, text, result):
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f'{file}:{line}: expected an object with a string "text" field')
        _add_text(value, result)


def _texts_csv(file: Path, text: str, result: LoadResult) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
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


def _chats_json(file: Path, text: str, result: LoadResult) -> None:
    for line, value in _json_list(file, text):
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        if not value.strip():
            result.skip("empty chat")
            continue
        try:
            result.items.append(check_chat(parse_flat_chat(value)))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None


def _chats_jsonl(file: Path, text: str, result: LoadResult) -> None:
    for line, record in _jsonl_records(file, text, result):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{file}:{line}: expected an object with a "messages" list')
        try:
            result.items.append(check_chat(record["messages"]))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None


# ----------------------------------------------------------------------------- JSON helpers


def _add_text(value: str, result: LoadResult) -> None:
    if value.strip():
        result.items.append(value)
    else:
        result.skip("empty text")


_WS = re.compile(r"[ \t\n\r]*")


def _json_list(file: Path, text: str) -> list[tuple[int, object]]:
    """Parse a JSON list and return (line, item) pairs: the line where each item starts."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, list):
        raise DataError(f"{file}:1: expected a JSON list of strings, got {_kind(doc)}")
    # The document is valid, so a second pass over it only needs to find where items start.
    decoder = json.JSONDecoder()
    pairs, line, seen = [], 1, 0
    pos = _WS.match(text, text.index("[") + 1).end()
    for _ in doc:
        line += text.count("\n", seen, pos)
        seen = pos
        value, pos = decoder.raw_decode(text, pos)
        pairs.append((line, value))
        pos = _WS.match(text, pos).end() + 1  # skip the ',' (or the final ']')
        pos = _WS.match(text, pos).end()
    return pairs


def _jsonl_records(file: Path, text: str, result: LoadResult):
    """Yield (line, parsed value) for each non-blank line; blank lines are counted."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new line
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            result.skip("blank line")
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{line}: not valid JSON ({e.msg})") from None


def _kind(value: object) -> str:
    """A JSON-flavoured name for the type of `value`, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "a number", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _fmt_skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
