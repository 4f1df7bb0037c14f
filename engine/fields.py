"""One way to declare, check, serialize and load the config dataclasses.

Each field says once what it accepts (``check``), what it means (``help``) and, when a
command line exposes it, how (``flag``); ``validate``, ``to_dict``, ``from_dict`` and the
CLI's argparse flags are all derived from that one declaration:

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(ConfigMixin):
    ...     size: int = option(4, at_least(1), "how many")
    >>> Demo(size=0)
    Traceback (most recent call last):
    ...
    tritonlm.engine.errors.SettingError: size must be >= 1, got 0
    >>> Demo.from_dict({"size": 2}).to_dict()
    {'size': 2}
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .errors import SettingError

Check = Callable[[str, Any], None]  # raises ValueError naming the field


def option(
    default: Any,
    check: Check | None = None,
    help: str = "",
    *,
    flag: bool = True,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A dataclass field with its check and its command-line description."""
    meta = {"check": check, "help": help, "flag": flag, "metavar": metavar, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_INT = 2**40  # beyond any real setting; keeps sizes far from int64 overflow
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def at_least(minimum: int, optional: bool = False, maximum: int = MAX_INT) -> Check:
    """An integer >= minimum and <= maximum (or None when optional)."""

    def check(name: str, v: Any) -> None:
        if optional and v is None:
            return
        if not _is_int(v):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {v}")
        if v > maximum:
            raise ValueError(f"{name} must be <= {maximum}, got {v}")

    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False, optional=False) -> Check:
    """A finite number in the given (half-)open or closed range (or None when optional)."""

    def check(name: str, v: Any) -> None:
        if optional and v is None:
            return
        if not _is_number(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")

    return check


def one_of(choices: Sequence[str]) -> Check:
    def check(name: str, v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {v!r}")

    return check


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


# ----------------------------------------------------------------------------- mixin


class ConfigMixin:
    """validate / to_dict / from_dict / replace for a dataclass declared with ``option``.

    Subclasses may set ``error`` (the exception class raised, an EngineError and
    ValueError subclass) and override ``check_together`` for rules that involve several
    fields. An error from one field's check carries that field's name (``error.field``).
    """

    error: type[Exception] = SettingError
    what = "config"  # how messages name it: "unknown model config key(s): ..."

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON gives lists where we keep tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``self.error`` naming the first bad field."""
        field = None
        try:
            for f in dataclasses.fields(self):
                check = f.metadata.get("check")
                if check is not None:
                    field = f.name
                    check(f.name, getattr(self, f.name))
            field = None
            self.check_together()
        except ValueError as e:
            if isinstance(e, self.error):
                raise
            head = re.match(r"\w+", str(e))  # a rule across fields names the one it starts with
            names = {f.name for f in dataclasses.fields(self)}
            if field is None and head and head.group() in names:
                field = head.group()
            raise self.error(str(e), field=field) from None

    def check_together(self) -> None:
        """Rules across fields (override); raise ValueError."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Any):
        """Build from parsed JSON; unknown keys are an error (a typo must not pass)."""
        if not isinstance(data, dict):
            raise cls.error(f"{cls.what} must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise cls.error(f"unknown {cls.what} key(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any):
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **changes})


# Fields whose command-line flag is not their name with dashes (the CLI's choice, kept here
# so that every front end and every message agree).
FLAG_NAMES = {"max_seq_len": "--seq-len"}

# An engine message names a field anywhere in its text by writing it in backticks.
_MARKED = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag_of(field: str) -> str:
    """The command-line flag of a config field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return FLAG_NAMES.get(field) or "--" + field.replace("_", "-")


def with_flag(message: str, field: str | None = None) -> str:
    """``message`` as a command-line user reads it: its leading field (``field``) and every
    field marked in backticks written as the flag the user types.

    >>> with_flag("max_new_tokens must be >= 1, got 0", "max_new_tokens")
    '--max-new-tokens must be >= 1, got 0'
    >>> with_flag("loss became nan; try a lower `lr` or a smaller `grad_clip`")
    'loss became nan; try a lower --lr or a smaller --grad-clip'
    """
    if field and message.startswith(field):
        message = flag_of(field) + message[len(field) :]
    return _MARKED.sub(lambda m: flag_of(m.group(1)), message)
