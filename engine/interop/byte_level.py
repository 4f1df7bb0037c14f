"""The byte-level alphabet of GPT-2-style tokenizer files (Hugging Face ``tokenizers``, GGUF).

Those formats store each token as a *string*, not as bytes: every byte 0..255 is shown as
one printable Unicode character, so that a token like ``b" the"`` is written ``"Ġthe"``.
Bytes that are already printable and not whitespace keep their own character (``"a"`` is
``"a"``); the other 68 (controls, space, 0x7F..0xA0, 0xAD) are moved, in byte order, to
the characters U+0100, U+0101, ... (so space 0x20 -> U+0120 ``"Ġ"``, newline -> ``"Ċ"``).

    >>> token_to_str(b" the\\n")
    'ĠtheĊ'
    >>> str_to_token('ĠtheĊ')
    b' the\\n'
"""

from __future__ import annotations


def _byte_chars() -> list[str]:
    """The character that stands for each byte value, indexed by byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: list[str] = [""] * 256
    for b in kept:
        chars[b] = chr(b)
    moved = [b for b in range(256) if b not in set(kept)]
    for i, b in enumerate(moved):  # the 68 others, in byte order, from U+0100 on
        chars[b] = chr(256 + i)
    return chars


BYTE_CHARS: list[str] = _byte_chars()
CHAR_BYTES: dict[str, int] = {c: b for b, c in enumerate(BYTE_CHARS)}


def token_to_str(token: bytes) -> str:
    """The byte-level string of a token's bytes (one character per byte)."""
    return "".join(BYTE_CHARS[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Invert :func:`token_to_str`; a character outside the alphabet raises ValueError."""
    try:
        return bytes(CHAR_BYTES[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{text!r} is not a byte-level token string (bad {e.args[0]!r})") from None
