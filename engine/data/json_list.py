"""Stream the items of a top-level JSON list, so memory holds one chunk plus one item.

`json.loads` on a 50 MB list keeps the text, the parsed list and every item at once;
here each item is decoded with `json.JSONDecoder.raw_decode` from a buffer that only holds
the text not yet parsed. An item cut by the end of the buffer makes the buffer grow (at
least doubling, so a huge item still costs linear time) and the item is decoded again.
Errors are `DataError`s with the file and line, worded like the `json` module's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .data_files import DataError, Utf8Chunks, open_regular

CHUNK_CHARS = 1 << 20  # text read at a time (tests shrink it to cross chunk edges often)

_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# What a top-level value that is not a list starts with, for the error message.
_STARTS = {"{": "an object", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}
# An item ending (or failing) this close to the end of the buffer may go on in the next
# chunk: "-Infinit" fails, "-2.5e-" parses as -2.5; both are decoded again with more text.
_NEAR_END = 10


class _Buffer:
    """The unparsed rest of the file: text `buf`, position `pos`, line of `pos` kept current."""

    def __init__(self, file: Path, chunks: Utf8Chunks):
        self.file, self.chunks = file, chunks
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self._line_pos = 1, 0  # line number at buf[_line_pos]

    def line_at(self, pos: int) -> int:
        """Line of buf[pos] (pos >= the last position asked for, so counting is linear)."""
        self.line += self.buf.count("\n", self._line_pos, pos)
        self._line_pos = pos
        return self.line

    def more(self) -> bool:
        """Drop the parsed text and read at least as much as is left; False at the end."""
        if self.eof:
            return False
        self.line_at(self.pos)
        self.buf, self.pos, self._line_pos = self.buf[self.pos :], 0, 0
        text = self.chunks.read(max(CHUNK_CHARS, len(self.buf)))
        self.eof = not text
        self.buf += text
        return not self.eof

    def next_char(self) -> str:
        """Skip whitespace; the next character ("" at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def error(self, msg: str, pos: int | None = None) -> DataError:
        line = self.line_at(self.pos if pos is None else pos)
        return DataError(f"{self.file}:{line}: not valid JSON ({msg})")

    def value(self) -> object:
        """Decode the value at `pos` and move past it."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - _NEAR_END
                if cut and not self.eof:
                    self.more()  # positions change: decode again, even at the end of file
                    continue
                raise self.error(e.msg, e.pos) from None
            except RecursionError:
                line = self.line_at(self.pos)
                raise DataError(f"{self.file}:{line}: JSON nested too deeply") from None
            except ValueError as e:  # e.g. an integer with more digits than Python allows
                raise self.error(str(e).split(";")[0]) from None
            if end > len(self.buf) - _NEAR_END and not self.eof:  # "-2.5e-" may go on "3"
                self.more()
                continue
            self.pos = end
            return value


def _items_inside_buffer(b: _Buffer) -> Iterator[tuple[int, object]]:
    """Yield the items followed by a ',' inside the buffer, from `b.pos` (which must be an
    item's start); stop before the first that is not, leaving it to the careful path."""
    buf, pos, decode, sep = b.buf, b.pos, _DECODER.raw_decode, _SEP.match
    end_of_text = len(buf)
    while True:
        try:
            value, end = decode(buf, pos)
        except (ValueError, RecursionError):
            break  # reported by _Buffer.value, which knows whether more text would help
        m = sep(buf, end)
        if m is None or m.end() >= end_of_text:
            break  # the list ends here, or the next item may be cut
        yield b.line_at(pos), value
        pos = m.end()
    b.pos = pos


def json_list_items(file: Path) -> Iterator[tuple[int, object]]:
    """Yield (line, item) for each item of the JSON list in `file`: the line it starts on.

    >>> list(json_list_items(Path("a.json")))    # doctest: +SKIP
    [(1, 'first'), (2, 'second')]               # a.json: '["first",\\n "second"]'
    """
    with open_regular(file) as fh:
        b = _Buffer(file, Utf8Chunks(file, fh))
        first = b.next_char()
        if first != "[":
            if first == "":
                raise b.error("Expecting value")
            kind = _STARTS.get(first, "a number" if first in "-0123456789" else None)
            if kind is None:
                raise b.error("Expecting value")
            raise DataError(
                f"{file}:{b.line_at(b.pos)}: expected a JSON list of strings, got {kind}"
            )
        b.pos += 1
        if b.next_char() == "]":
            b.pos += 1
        else:
            while True:
                yield from _items_inside_buffer(b)  # the fast path, up to a chunk's edge
                line = b.line_at(b.pos)  # then one item that may cross the edge
                yield line, b.value()
                c = b.next_char()
                b.pos += 1
                if c == "]":
                    break
                if c != ",":
                    b.pos -= 1
                    raise b.error("Expecting ',' delimiter")
                b.next_char()  # a ']' here is "Expecting value" from the decoder, as in json
        if b.next_char() != "":
            raise b.error("Extra data")
