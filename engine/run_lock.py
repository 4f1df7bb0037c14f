"""Exclusive locks so that two processes never write the same run or token-cache entry.

The lock is ``flock`` on a file beside the locked path (``.<name>.lock``; the path itself is
replaced by renames, so it cannot hold the lock). The kernel drops the lock when its holder
dies, so a lock left by a dead process is simply taken over; the file records the holder's
pid for the error message. The file is removed on release; a process that opened it just
before checks, after locking, that it still holds the file that is in place, and retries
otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import EngineError


class BusyError(EngineError, RuntimeError):
    """Another live process holds the lock."""


def lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock of ``path`` for the block. ``wait=False`` raises BusyError naming the
    holder's pid at once; ``wait=True`` blocks until the holder is done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = lock_file(path)
    while True:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise BusyError(
                f"{what} {path} is in use by another process (pid {pid}); wait for it to "
                "finish or choose another directory"
            ) from None
        try:  # the holder before us may have removed the file we opened: start again
            same = os.fstat(fd).st_ino == os.stat(name).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)  # while still locked: no one can have locked this inode
        os.close(fd)
