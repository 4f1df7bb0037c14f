"""The --threads flag shared by llm-chat, llm-serve and llm-eval (the default is measured:
see engine/threads.py)."""

from __future__ import annotations

import argparse

from tritonlm.engine.errors import SettingError
from tritonlm.engine.threads import DEFAULT_INFERENCE_THREADS, resolve_threads, use_threads

from .common import UsageError, user_message


def add_threads_flag(group) -> None:
    group.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads for torch (default: {DEFAULT_INFERENCE_THREADS}: more threads "
        "collapse a decode step when another program keeps a core busy)",
    )


def apply_threads(args: argparse.Namespace) -> int:
    """Set the threads from ``args.threads``; a bad count is a UsageError."""
    try:
        n = resolve_threads(args.threads)
    except SettingError as e:
        raise UsageError(user_message(e)) from None
    use_threads(n)
    return n
