"""What every tritonlm command line shares: one-line errors, exit codes, config flags.

UsageError  -> "PROG: error: <one line>" on stderr, exit 2
EngineError (data, checkpoint, tokenizer, training, ...) -> the same, exit 2; a message
    that starts with a config field's name says the flag instead (max_new_tokens ->
    --max-new-tokens)
Ctrl-C before anything could be saved -> exit 130
anything else (a bare ValueError, an unexpected OSError) is a bug: its traceback shows
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class UsageError(Exception):
    """A bad command line, setting or input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and raise UsageError."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class Collect(argparse.Action):
    """A list flag (``nargs="+"``) that may also be repeated: ``--data a --data b`` means
    ``--data a b``. The first occurrence replaces the default, later ones add to it (plain
    argparse keeps only the last one). Values a ``type`` returns as tuples (``.md,.py``)
    are flattened into the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        for v in values:
            items.extend(v) if isinstance(v, tuple) else items.append(v)
        setattr(namespace, self.dest, items)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def report(prog: str, message: object, file=None) -> int:
    """Print ``PROG: error: message`` as exactly one line; return exit code 2."""
    print(f"{prog}: error: {one_line(message)}", file=file or sys.stderr, flush=True)
    return EXIT_ERROR


def known_errors() -> tuple[type[BaseException], ...]:
    """User errors: printed as one line, never as a traceback."""
    from tritonlm.engine.errors import EngineError

    return (UsageError, EngineError)


def user_message(e: BaseException) -> str:
    """What to print for a user error: an engine message names config fields, the user
    typed flags (``max_new_tokens must be >= 1`` -> ``--max-new-tokens must be >= 1``)."""
    from tritonlm.engine.fields import with_flag

    return with_flag(str(e), getattr(e, "field", None))


@contextlib.contextmanager
def naming(option: str):
    """An OSError from the filesystem, where the user named the path, becomes one line
    naming the option it concerns (``--out runs/x: permission denied``)."""
    from tritonlm.engine.errors import os_reason

    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise UsageError(f"{option}: {os_reason(e)}{where}") from None


def run_main(prog: str, body: Callable[[], int], on_error: Callable[[str, Exception], int]
             | None = None) -> int:  # fmt: skip
    """Run a command's body, turning every expected failure into one line and an exit code.
    ``on_error(prog, exc)`` may report an engine error differently (llm-train's ranks)."""
    try:
        return body()
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except known_errors() as e:
        return on_error(prog, e) if on_error is not None else report(prog, user_message(e))


# ----------------------------------------------------------------------------- config flags


def _base_type(annotation) -> type:
    """int for ``int | None``, float for ``float``, ..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _converter(kind: type, name: str, cls) -> Callable[[str], object]:
    """Parse the text as ``kind`` and apply the field's own check (one message source)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            word = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None
        check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("check")
        if check is not None:
            try:
                check(name, value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e).replace(f"{name} ", "", 1)) from None
        return value

    return parse


def add_config_flags(group, cls, names: Iterable[str] | None = None, *,
                     defaults: bool = True, help_suffix: str = "") -> None:  # fmt: skip
    """One ``--flag-name`` per field of config dataclass ``cls`` (declared with
    engine.fields.option and ``flag=True``): type, choices, help and default all come from
    the field. ``defaults=False`` leaves them None (e.g. overrides of a preset)."""
    from tritonlm.engine.fields import flag_of, with_flag

    wanted = None if names is None else set(names)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag") or (wanted is not None and f.name not in wanted):
            continue
        flag = flag_of(f.name)
        kind = _base_type(hints[f.name])
        help_text = with_flag(meta.get("help") or "")  # a field named in it -> its flag
        if kind is bool:  # a field on by default gets --no-<name>
            off = f.default is True
            group.add_argument(
                "--no-" + flag[2:] if off else flag,
                dest=f.name,
                default=None,
                action="store_false" if off else "store_true",
                help=help_text,
            )
            continue
        default = f.default if defaults else None
        if defaults and f.default is not None:
            help_text += f" (default: {f.default})"
        group.add_argument(
            flag,
            dest=f.name,
            type=None if meta.get("choices") else _converter(kind, f.name, cls),
            choices=meta.get("choices"),
            default=default,
            metavar=meta.get("metavar"),
            help=help_text + help_suffix,
        )


def config_values(args: argparse.Namespace, cls) -> dict:
    """The flags of ``cls`` the user gave (or that have defaults), by field name."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("flag")}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
