"""Datasets: pretraining texts and chat conversations, loaded from files with clear errors.

Formats (chosen by file extension; a folder is searched recursively):

    pretraining texts                      chats
    .txt    the whole file is one document  -
    .json   a list of strings               a list of flat strings "User: ... Assistant: ..."
    .jsonl  one {"text": "..."} per line    one {"messages": [{"role", "content"}, ...]} per line
    .csv    no header; each row is one text -
            (its non-empty cells, stripped, joined with one space)
    .parquet  a "text" column               a "messages" column (list of {role, content})
    .md .rst .py ... plain text, like .txt  -
    .jsonl.gz .jsonl.zst .txt.gz .txt.zst: the same, decompressed as a stream

The text field / column is "text" unless `text_field` says otherwise; the plain-text
extensions and the streaming readers are in engine/corpus_formats.py.

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
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .corpus_formats import DEFAULT_TEXT_EXTS, Source, open_stream, parquet_column, plain_texts
from .data_files import COMPRESSIONS, DataError, PathWalker, ext_of, read_lines
from .json_list import json_list_items

__all__ = ["LoadResult", "check_chat", "load_chats", "load_texts", "parse_flat_chat"]

ROLES = ("system", "user", "assistant")
STRUCTURED = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".gz", ".zst")  # not --text-ext
Skip = Callable[[str], None]
Reader = Callable[[Source, Skip], Iterator]

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


def load_texts(
    paths: PathLike | Iterable[PathLike],
    option: str | None = None,
    text_field: str = "text",
    text_exts: Sequence[str] = DEFAULT_TEXT_EXTS,
) -> LoadResult:
    """Load pretraining documents (`list[str]`) from files and folders, in the given order.

    `option` (e.g. "--data") starts every error message, so a command line's error says
    which of its options holds the bad path. `text_field`: the JSONL key / Parquet column
    of the text; `text_exts`: the extensions read as plain text besides .txt. For a corpus
    too large for memory, stream it instead (engine/corpus.py).

    >>> load_texts(["notes.txt", "more.json"]).items    # doctest: +SKIP
    ['whole text of notes.txt', 'first string of more.json', ...]
    """
    found = scan(paths, text_readers(text_exts), "texts", option, text_field)
    found.result.items = list(read_items(found))
    return found.result


def load_chats(paths: PathLike | Iterable[PathLike], option: str | None = None) -> LoadResult:
    """Load conversations (`list[list[{"role", "content"}]]`) from .json, .jsonl(.gz/.zst)
    and .parquet (a "messages" column) files.

    Each conversation passes `check_chat`: known roles, non-empty contents, an optional
    system message only at the start, and at least one assistant turn.
    """
    found = scan(paths, CHAT_READERS, "chats", option)
    found.result.items = list(read_items(found))
    return found.result


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


# ----------------------------------------------------------------------------- scanning, reading


def text_readers(text_exts: Sequence[str] = DEFAULT_TEXT_EXTS) -> dict[str, Reader]:
    """Extension -> reader for pretraining texts; `text_exts` are read as plain text."""
    readers: dict[str, Reader] = {".txt": _texts_plain}
    for ext in check_text_exts(text_exts):
        readers[ext] = _texts_plain
    readers.update({".json": _texts_json, ".jsonl": _texts_jsonl, ".csv": _texts_csv,
                    ".parquet": _texts_parquet})  # fmt: skip
    for c in COMPRESSIONS:
        readers[".txt" + c], readers[".jsonl" + c] = _texts_plain, _texts_jsonl
    return readers


def check_text_exts(exts: Sequence[str]) -> tuple[str, ...]:
    """Validate plain-text extensions (".md", ...): lower-cased, without repeats."""
    out: list[str] = []
    for raw in exts:
        ext = raw.strip().lower()
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext or ext.count(".") > 1:
            raise DataError(f"text extension {raw!r} must look like '.md'")
        if ext in STRUCTURED:
            raise DataError(f"text extension {ext!r} is a structured format, not plain text")
        if ext not in out:
            out.append(ext)
    return tuple(out)


@dataclass
class Scan:
    """The checked, expanded input files of one option, ready to be read by `read_items`."""

    files: list[Path]
    named: set[Path]
    readers: dict
    what: str
    option: str | None
    text_field: str
    result: LoadResult
    inputs: str = ""  # the paths as given, for the "no usable texts" message
    current: Source | None = None  # the file being read (its position: progress in bytes)
    done_bytes: int = 0  # on-disk size of the files read completely

    def total_bytes(self) -> int:
        return sum(_size(f) for f in self.files)

    def position(self) -> int:
        """On-disk bytes read so far (compressed bytes for .gz/.zst files)."""
        return self.done_bytes + (self.current.position() if self.current else 0)


def scan(paths, readers: dict, what: str, option: str | None, text_field: str = "text") -> Scan:
    """Check and expand every path (so a bad one fails fast) without reading any file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    result = LoadResult(items=[])
    try:
        if not paths:
            raise DataError(f"no input paths given for {what}")
        walker = PathWalker(tuple(readers), lambda reason, path: result.skip(reason, 1, path))
        for path in paths:
            walker.add(path)
    except DataError as e:
        raise _prefixed(e, option) from None
    inputs = ", ".join(str(p) for p in paths)
    return Scan(walker.files, walker.named, readers, what, option, text_field, result, inputs)


def read_items(found: Scan) -> Iterator:
    """Yield every usable item of every file, in order; skips are counted in
    `found.result`. No usable item at all is a `DataError` (raised at the end)."""
    result, n = found.result, 0
    try:
        for file in found.files:
            result.sources.append(str(file))
            src = Source(file, lenient=file not in found.named, text_field=found.text_field)
            found.current = src
            for item in found.readers[ext_of(file)](src, result.skip):
                n += 1
                yield item
            found.current = None
            found.done_bytes += _size(file)
        if not n:
            skipped = _fmt_skipped(result.skipped, result.examples)
            detail = f" (skipped: {skipped})" if result.skipped else ""
            raise DataError(f"{found.inputs}: no usable {found.what} found{detail}")
    except DataError as e:
        raise _prefixed(e, found.option) from None


def _prefixed(e: DataError, option: str | None) -> DataError:
    return DataError(f"{option} {e}") if option else e


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------- readers


def _texts_plain(src: Source, skip: Skip) -> Iterator[str]:
    yield from plain_texts(src, skip)  # decoded strictly from bytes: no lone surrogates


def _texts_json(src: Source, skip: Skip) -> Iterator[str]:
    file, surrogate = src.file, _SURROGATE.search  # the hot loop of a big corpus
    for line, value in json_list_items(file):
        if type(value) is not str:
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        if surrogate(value):
            raise DataError(f"{file}:{line}: text {_SURROGATE_MSG}")
        if value and not value.isspace():
            yield value
        else:
            skip("empty text")


def _texts_jsonl(src: Source, skip: Skip) -> Iterator[str]:
    key, file = src.text_field, src.file
    for line, record in _jsonl_records(src, skip):
        value = record.get(key) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: expected an object with a string {_q(key)} field")
        if _SURROGATE.search(value):
            raise DataError(f"{file}:{line}: text {_SURROGATE_MSG}")
        if value.strip():
            yield value
        else:
            skip("empty text")


def _texts_csv(src: Source, skip: Skip) -> Iterator[str]:
    # Streamed line by line (a quoted cell may span lines; csv asks for the next one).
    # strict: an unclosed quote would otherwise swallow the rest of the file into one cell
    lines = (text for _, text in read_lines(src.file))
    reader = csv.reader(lines, strict=True)
    line = 1
    try:
        for row in reader:
            joined = " ".join(cell.strip() for cell in row if cell.strip())
            if joined:
                yield joined
            else:
                skip("empty row")
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{src.file}:{line}: bad CSV row ({e})") from e


def _texts_parquet(src: Source, skip: Skip) -> Iterator[str]:
    for _, value in parquet_column(src, src.text_field, "text"):
        if value is None:
            skip("null text")
        elif value.strip():
            yield value
        else:
            skip("empty text")


def _chats_json(src: Source, skip: Skip) -> Iterator[list]:
    file = src.file
    for line, value in json_list_items(file):
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: list item is {_kind(value)}, expected a string")
        if not value.strip():
            skip("empty chat")
            continue
        try:
            chat = check_chat(parse_flat_chat(value))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None
        yield chat


def _chats_jsonl(src: Source, skip: Skip) -> Iterator[list]:
    file = src.file
    for line, record in _jsonl_records(src, skip):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{file}:{line}: expected an object with a "messages" list')
        try:
            chat = check_chat(record["messages"])
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from None
        yield chat


def _chats_parquet(src: Source, skip: Skip) -> Iterator[list]:
    for row, value in parquet_column(src, "messages", "chat"):
        if value is None:
            skip("null chat")
            continue
        try:
            chat = check_chat(value)
        except DataError as e:
            raise DataError(f"{src.file}: row {row}: {e}") from None
        yield chat


CHAT_READERS: dict = {".json": _chats_json, ".jsonl": _chats_jsonl, ".parquet": _chats_parquet}
CHAT_READERS.update({".jsonl" + c: _chats_jsonl for c in COMPRESSIONS})

# ----------------------------------------------------------------------------- JSON helpers

# A \ud800-\udfff escape decodes to half of a UTF-16 pair: not text, and unencodable later.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_MSG = "holds an unpaired surrogate (a \\ud800-\\udfff escape), which is not text"


def _q(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _jsonl_records(src: Source, skip: Skip):
    """Yield (line, parsed value) for each non-blank line; blank lines are counted."""
    file = src.file
    with open_stream(src) as fh:
        yield from _parsed_lines(file, read_lines(file, fh), skip)


def _parsed_lines(file: Path, lines, skip: Skip):
    for line, raw in lines:
        if not raw.strip():
            skip("blank line")
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
