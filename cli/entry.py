"""Console-script entry points: take over Ctrl-C before anything heavy is imported.

``llm-train`` / ``llm-chat`` start here. Until a command installs its own handlers, a
SIGINT or SIGTERM (also one inherited as ignored) ends the process quietly with exit 130,
so an early Ctrl-C (while torch loads, say) never prints a traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def _early_stop(signum, frame) -> None:
    sys.stderr.write("\ninterrupted\n")
    os._exit(130)


def _take_over_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _early_stop)


def train() -> int:
    _take_over_signals()
    from .train import main

    return main()


def chat() -> int:
    _take_over_signals()
    from .chat import main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # llm-chat: Ctrl-C stops an answer
    return main()
