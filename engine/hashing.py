"""sha256 of a file, read in blocks (checkpoint manifests, corpus fingerprints)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import BinaryIO

BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike, opener: Callable[..., BinaryIO] | None = None) -> str:
    """Hex sha256 of the file's bytes. ``opener(path)`` opens it for reading in binary
    (default ``open(path, "rb")``; the data layer passes one that refuses special files).
    OSError from reading propagates: the caller words it for its own error type."""
    h = hashlib.sha256()
    with opener(path) if opener is not None else open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()
