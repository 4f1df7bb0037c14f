"""Finding and opening dataset files safely: paths given by a user are untrusted input.

A data path may name a FIFO (opening it blocks forever), a device (/dev/zero never ends),
a symlink loop, an unreadable folder or the same file twice. This module turns every such
case into a `DataError` naming the path, or a counted skip, before any byte is read, and
decodes files as strict UTF-8 with the line and byte offset of the first bad byte.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import EngineError, os_reason


class DataError(EngineError, ValueError):
    """A dataset that cannot be used; the message names the file and the line or row."""


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_regular(path: Path, mode: int) -> DataError:
    kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
    return DataError(f"{path}: is {kind}, not a regular file; give a file or a folder")


def _stat(path: Path) -> os.stat_result:
    """os.stat (following symlinks) with every failure as a DataError naming `path`."""
    try:
        return os.stat(path)
    except ValueError:  # an embedded NUL character
        raise DataError(f"{str(path)!r}: invalid path (it holds a NUL character)") from None
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise DataError(f"{path}: broken symbolic link (to {os.readlink(path)!r})") from None
        raise DataError(f"{path}: {os_reason(e)}") from None


COMPRESSIONS = (".gz", ".zst")


def ext_of(path: Path) -> str:
    """The lower-case extension that picks a reader: ".jsonl", or ".jsonl.zst" when compressed.

    >>> ext_of(Path("a/Part-0.JSONL.zst")), ext_of(Path("notes.md")), ext_of(Path("x.gz"))
    ('.jsonl.zst', '.md', '.gz')
    """
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[1] in COMPRESSIONS:
        return suffixes[0] + suffixes[1]
    return suffixes[-1] if suffixes else ""


class PathWalker:
    """Expand data paths into the list of files to read, each file at most once.

    A file stands for itself; a folder for its files with a known extension, recursively,
    sorted by name at every level (so by relative path parts). Symbolic links are followed;
    a file or folder reached a second time (given twice, inside a folder given too, through
    a link, or a link back to a parent) is not read again: `skip(reason, path)` counts it.
    Hidden names (starting with ".") inside folders are not data and are never looked at.
    """

    def __init__(self, extensions: tuple[str, ...], skip: Callable[[str, Path], None]):
        self.extensions = extensions
        self.skip = skip
        self.files: list[Path] = []
        self.named: set[Path] = set()  # files given by name (not found in a folder)
        self._seen: set[object] = set()

    def add(self, raw: str | os.PathLike) -> None:
        """Add one path given by the user (an error in it is a DataError, never a skip)."""
        if os.fspath(raw) == "":
            raise DataError("'': empty path (use '.' for the current folder)")
        path = Path(raw)
        st = _stat(path)
        if stat.S_ISDIR(st.st_mode):
            if self._first(path, st):
                self._walk(path, top=True)
        elif stat.S_ISREG(st.st_mode):
            if ext_of(path) not in self.extensions:
                raise DataError(
                    f"{path}: unsupported file type {ext_of(path) or '(none)'!r} "
                    f"(expected one of {', '.join(self.extensions)})"
                )
            if self._first(path, st):
                self.files.append(path)
                self.named.add(path)
        else:
            raise _not_regular(path, st.st_mode)

    def _first(self, path: Path, st: os.stat_result) -> bool:
        """True the first time this file or folder is met; a later meeting is counted."""
        key = (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)
        if key in self._seen:
            self.skip("duplicate path", path)
            return False
        self._seen.add(key)
        return True

    def _walk(self, folder: Path, top: bool = False) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if top:  # the folder the user named: an error, not a skip
                raise DataError(f"{folder}: {os_reason(e)}") from None
            self.skip("unreadable folder", folder)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            st = _stat(path)
            if stat.S_ISDIR(st.st_mode):
                if self._first(path, st):
                    self._walk(path)
            elif not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
            elif ext_of(path) not in self.extensions:
                self.skip("file with unsupported extension in folder", path)
            elif self._first(path, st):
                self.files.append(path)


# ----------------------------------------------------------------------------- reading


def open_regular(file: Path):
    """Open `file` for binary reading, refusing anything but a regular file.

    O_NONBLOCK makes opening a FIFO return at once (a FIFO swapped in after the walk's
    check would otherwise block forever); fstat then checks the file actually opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(file, flags)
    except OSError as e:
        raise DataError(f"{file}: {os_reason(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # a folder where only a file will do (e.g. --task)
            raise DataError(f"{file}: is a folder; give a file")
        if not stat.S_ISREG(mode):
            raise _not_regular(file, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_start(file: Path, data: bytes) -> int:
    """Bytes to skip at the start of a file: a UTF-8 byte-order mark is dropped."""
    if data.startswith(codecs.BOM_UTF8):
        return len(codecs.BOM_UTF8)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{file}:1: starts with a UTF-16 byte-order mark; save it as UTF-8")
    return 0


def decode(file: Path, data: bytes, offset: int, line: int, final: bool = True):
    """Strict UTF-8 -> (text, bytes used); `data` starts at byte `offset`, line `line`.

    With ``final=False`` an incomplete character at the end is left unused (for chunks).
    A NUL byte is refused: text never holds one, a binary or UTF-16 file does.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        where = line + data.count(b"\n", 0, nul)
        raise DataError(
            f"{file}:{where}: NUL byte at offset {offset + nul} (a binary or UTF-16 file?)"
        )
    try:
        return codecs.utf_8_decode(data, "strict", final)
    except UnicodeDecodeError as e:
        where = line + data.count(b"\n", 0, e.start)
        raise DataError(
            f"{file}:{where}: not valid UTF-8 "
            f"(byte 0x{data[e.start]:02x} at offset {offset + e.start})"
        ) from None


def _read(file: Path, fh, size: int = -1) -> bytes:
    try:
        return fh.read(size)
    except OSError as e:
        raise DataError(f"{file}: {os_reason(e)}") from None


def read_text(file: Path) -> str:
    """The whole file as strict UTF-8 text (a leading byte-order mark is dropped)."""
    with open_regular(file) as fh:
        data = _read(file, fh)
    start = _check_start(file, data)
    return decode(file, data[start:] if start else data, start, 1)[0]


def read_lines(file: Path, fh=None) -> Iterator[tuple[int, str]]:
    """(line number, text with its newline) for each line; memory: one line at a time.

    ``fh``: an already opened binary stream (a decompressor, say) instead of ``file``.
    """
    with open_regular(file) if fh is None else contextlib.nullcontext(fh) as fh:
        offset, number = 0, 0
        while True:
            try:
                raw = fh.readline()
            except OSError as e:
                raise DataError(f"{file}: {os_reason(e)}") from None
            if not raw:
                return
            number += 1
            start = _check_start(file, raw) if number == 1 else 0
            yield number, decode(file, raw[start:], offset + start, number)[0]
            offset += len(raw)


class Utf8Chunks:
    """A file decoded as strict UTF-8 one chunk at a time (memory: one chunk).

    `read(size)` returns the next piece of text, "" only at the end of the file; a
    character split between two chunks is kept back until the next call.
    """

    def __init__(self, file: Path, fh):
        self.file, self.fh = file, fh
        self.offset, self.line = 0, 1  # where `pending` starts
        self.pending = b""
        self.started = False

    def read(self, size: int) -> str:
        while True:
            data = _read(self.file, self.fh, size)
            final = not data
            data = self.pending + data if self.pending else data
            if not self.started:
                if len(data) < 3 and not final:  # too short to tell a byte-order mark
                    self.pending = data
                    continue
                self.started = True
                start = _check_start(self.file, data)
                data, self.offset = data[start:], start
            text, used = decode(self.file, data, self.offset, self.line, final)
            self.pending = data[used:]
            self.line += data.count(b"\n", 0, used)
            self.offset += used
            if text or final:
                return text
