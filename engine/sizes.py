"""Sizes typed by people ("5GB", "512MiB", "300M"): one parser, one meaning everywhere.

Decimal units are powers of 10 (1GB = 10**9 bytes, as disks and Hugging Face count),
binary units powers of 2 (1GiB = 2**30); a bare K/M/G/T is the decimal unit.
"""

from __future__ import annotations

import re

from .errors import SettingError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"5GB"`` or ``"512MiB"``; a plain number is bytes.
    SettingError (a ValueError; one line, quoting the input) on anything else or on
    less than one byte.

    >>> parse_size("5GB"), parse_size("1.5kB"), parse_size("2KiB"), parse_size("300M")
    (5000000000, 1500, 2048, 300000000)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text).strip().lower())
        if not isinstance(text, str) or match is None or match.group(2) not in _UNITS:
            raise SettingError(f"expected a size such as 5GB, 500MB, 2GiB or 123 (bytes), "
                             f"got {text!r}")  # fmt: skip
        number, unit = match.group(1), _UNITS[match.group(2)]
        # whole numbers stay exact; "1.5GB" goes through a float
        value = int(number) * unit if "." not in number else int(float(number) * unit)
    if value <= 0:
        raise SettingError(f"a size must be at least 1 byte, got {text!r}")
    return value
