"""Console-script entry points: take over Ctrl-C before anything heavy is imported.

Every console script (``llm-train``, ``llm-chat``, ``llm-export``, ...) starts here. Until
a command installs its own handlers, a SIGINT or SIGTERM (also one inherited as ignored)
ends the process quietly with exit 130, so an early Ctrl-C (while torch loads, say) never
prints a traceback.
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


def export() -> int:
    _take_over_signals()
    from .export import main

    return main()


def import_hf() -> int:
    _take_over_signals()
    from .import_hf import main

    return main()


def serve() -> int:
    _take_over_signals()
    from .serve import main

    return main()


def evaluate() -> int:
    _take_over_signals()
    from .evaluate import main

    return main()
