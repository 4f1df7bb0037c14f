"""The engine's user-facing errors, and how an OS error is worded in them.

Every error the engine raises for bad input (a file, a setting, a checkpoint, a request)
derives from :class:`EngineError`; front ends print those as one line. Anything else that
escapes (a bare ValueError, an OSError nobody expected) is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class EngineError(Exception):
    """A problem with what the user gave; the message is one line and says what to fix.

    ``field`` names the config field the message starts with, when there is one, and a
    field named later in the message is written in backticks (``try a lower `lr```), so a
    front end can say ``--max-new-tokens``/``--lr`` where the engine says the field
    (``engine.fields.with_flag``).
    """

    field: str | None = None

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class SettingError(EngineError, ValueError):
    """A setting outside what it accepts (a config field, a size, an evaluation option)."""


# Short reasons for common OS errors (instead of "[Errno 13] Permission denied: '...'").
_REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.EIO: "input/output error",
}


def os_reason(e: OSError) -> str:
    """Why an OS call failed, without errno noise or the path (the caller names it).

    >>> os_reason(PermissionError(13, "Permission denied", "/x"))
    'permission denied'
    >>> os_reason(OSError(28, "No space left on device"))
    'no space left on device'
    """
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]
