"""Readers for large corpora: compressed streams, Parquet, plain text and source files.

Every reader is a generator ``reader(src, skip) -> documents``: it reads its file as a
stream (memory: one line, one Parquet batch or one text piece at a time), yields each usable
item, calls ``skip(reason)`` for each empty one, and raises a `DataError` located at
"file:line:" (or "file: row N:" for Parquet) for anything malformed.

    .jsonl.gz  .jsonl.zst   JSON lines, decompressed on the fly
    .txt.gz    .txt.zst     plain text, decompressed on the fly
    .parquet                one text column (``--text-field``, default "text"), or a
                            "messages" column (a list of {role, content}) for chats
    .md .rst .py ...        plain text (`DEFAULT_TEXT_EXTS`; ``--text-ext`` changes the list)

A plain-text file is one document; a file larger than `TEXT_PIECE` characters is read in
pieces cut after a line break, each piece a document, so memory never holds a whole file.
A plain-text file found in a folder that starts with a NUL byte within its first 8 KiB,
or is not UTF-8 before its first piece, is binary: skipped and counted, not an error.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .data_files import DataError, Utf8Chunks, open_regular

# Markup and source code read as plain text by default ("--text-ext" replaces this list).
DEFAULT_TEXT_EXTS = (
    ".md", ".markdown", ".rst", ".tex", ".org", ".adoc",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt",
    ".scala", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".pl", ".lua", ".jl", ".swift",
    ".sh", ".sql", ".html", ".css", ".xml", ".yaml", ".yml", ".toml", ".ini", ".cfg",
)  # fmt: skip
TEXT_PIECE = 8 << 20  # characters: a plain-text file longer than this becomes several documents
SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a binary file
PARQUET_BATCH = 1024  # rows decoded at a time

Skip = Callable[[str], None]


@dataclass
class Source:
    """One file to read: `lenient` when found in a folder (binary files are skipped), the
    options that pick a Parquet column, and the raw handle (for progress in bytes)."""

    file: Path
    lenient: bool = False
    text_field: str = "text"
    raw: object = field(default=None, repr=False)
    rows: tuple[int, int, int] | None = None  # Parquet: (rows read, rows, file size)

    def position(self) -> int:
        """Bytes of the file on disk read so far (compressed bytes for .gz/.zst; for
        Parquet, which reads whole column chunks, the share of rows read)."""
        if self.rows is not None:
            done, total, size = self.rows
            return size * done // max(total, 1)
        try:
            return self.raw.tell() if self.raw is not None else 0
        except (OSError, ValueError):
            return 0


class _Checked:
    """A decompressing stream whose corrupt or truncated data is a `DataError`."""

    def __init__(self, file: Path, stream, kind: str):
        self.file, self.stream, self.kind = file, stream, kind

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except DataError:
            raise
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{self.file}: corrupt or truncated {self.kind} data ({e})") from None
        except Exception as e:  # zstandard.ZstdError derives from Exception only
            if type(e).__name__ != "ZstdError":
                raise
            raise DataError(f"{self.file}: corrupt or truncated {self.kind} data ({e})") from None

    def read(self, size: int = -1) -> bytes:
        return self._call(self.stream.read, size)

    def readline(self) -> bytes:
        return self._call(self.stream.readline)

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _ZstdFrames(io.RawIOBase):
    """Every zstd frame of a file, one after the other; a file that ends inside a frame
    is an error (zstandard's stream reader would end quietly, losing the rest)."""

    def __init__(self, raw, dctx):
        self.raw, self.dctx = raw, dctx
        self.obj, self.out, self.pos = dctx.decompressobj(), b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos >= len(self.out):
            data = self.obj.unused_data if self.obj.eof else b""
            if self.obj.eof:  # the next frame starts with what the last one left
                self.obj = self.dctx.decompressobj()
            data = data or self.raw.read(1 << 16)
            if not data:
                if self.obj.eof or self._fresh:
                    return 0
                raise EOFError("the file ends inside a zstd frame")
            self._fresh = False
            self.out, self.pos = self.obj.decompress(data), 0
            if self.obj.eof and not self.obj.unused_data:
                self._fresh = True  # a clean frame end: the file may end here
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n

    _fresh = True  # no byte of the current frame read yet


def open_stream(src: Source):
    """Open `src.file` for binary reading, decompressing .gz / .zst on the fly."""
    raw = open_regular(src.file)
    src.raw = raw
    name = src.file.name.lower()
    try:
        if name.endswith(".gz"):
            return _Checked(src.file, gzip.GzipFile(fileobj=raw, mode="rb"), "gzip")
        if name.endswith(".zst"):
            import zstandard

            reader = _ZstdFrames(raw, zstandard.ZstdDecompressor())
            return _Checked(src.file, io.BufferedReader(reader, 1 << 20), "zstd")
    except BaseException:
        raw.close()
        raise
    return _Checked(src.file, raw, "file")


# ----------------------------------------------------------------------------- plain text


def is_binary(src: Source) -> bool:
    """True if the (decompressed) start of the file holds a NUL byte."""
    with open_stream(src) as fh:
        return b"\x00" in fh.read(SNIFF_BYTES)


def plain_texts(src: Source, skip: Skip) -> Iterator[str]:
    """The file as one document, or as pieces of about `TEXT_PIECE` characters cut after a
    line break when it is longer (empty ones are counted under "empty text")."""
    if src.lenient and is_binary(src):
        skip("binary file")
        return
    with open_stream(src) as fh:
        chunks = Utf8Chunks(src.file, fh)
        buf, yielded = "", False  # text read but not yet yielded
        while True:
            try:
                text = chunks.read(min(1 << 20, TEXT_PIECE))
            except DataError:
                if src.lenient and not yielded:  # e.g. a Latin-1 file in a source tree
                    skip("binary or non-UTF-8 file")
                    return
                raise
            buf += text
            if not text:  # the end: what is left is the last piece (or the whole file)
                if buf.strip():
                    yield buf
                elif buf or not yielded:
                    skip("empty text")
                return
            cut = buf.rfind("\n") + 1 if len(buf) >= TEXT_PIECE else 0
            if cut:  # a long text so far: yield it up to its last line break
                piece, buf = buf[:cut], buf[cut:]
                if piece.strip():
                    yielded = True
                    yield piece
                else:
                    skip("empty text")


# ----------------------------------------------------------------------------- Parquet


def parquet_column(src: Source, column: str, what: str) -> Iterator[tuple[int, object]]:
    """(row number from 1, value) of one column, a batch of rows in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(src.file) as raw:
        src.raw = raw
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{src.file}: not a readable Parquet file ({_first_line(e)})") from None
        names = pf.schema_arrow.names
        if column not in names:
            hint = "; choose one with `text_field`" if what == "text" else ""
            raise DataError(
                f"{src.file}: no column {column!r} (columns: {', '.join(names) or 'none'}){hint}"
            )
        kind = pf.schema_arrow.field(column).type
        if what == "text" and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{src.file}: column {column!r} holds {kind}, expected strings")
        row, rows, size = 0, pf.metadata.num_rows, raw.seek(0, 2)
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column]):
                src.rows = (row, rows, size)
                for value in batch.column(0).to_pylist():
                    row += 1
                    yield row, value
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{src.file}: row {row + 1}: unreadable ({_first_line(e)})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{src.file}: row {row + 1}: not valid UTF-8 ({e.reason})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
