"""Token bytes -> releasable text: UTF-8 across token boundaries, and stop strings.

Each generated token contributes its bytes; bytes are decoded with an incremental UTF-8
decoder, so a character split across tokens appears once complete. Text that could be the
start of a stop string is held back until it is known not to be, so a stop string never
reaches the output, even split across several tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextStream", "longest_stop_prefix_suffix"]


class TextStream:
    """Turn token bytes into releasable text: UTF-8 across token boundaries, stop strings.

    >>> ts = TextStream(stop=("END",))
    >>> ts.push("é".encode()[:1]), ts.push("é".encode()[1:] + b"xE")
    ('', 'éx')
    >>> ts.push(b"N"), ts.push(b"D and more"), ts.stopped, ts.text
    ('', '', True, 'éx')
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded but held back (could start a stop string)
        self.text = ""  # released so far
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the newly releasable text."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release everything still held (no stop string completed)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self._pending
        cut = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = pending[:cut], "", True
        elif final or not self.stop:
            out, self._pending = pending, ""
        else:
            hold = longest_stop_prefix_suffix(pending, self.stop)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out


def longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    ``("Hello Us", ["User:"]) -> 2`` ("Us" may become "User:").
    """
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
