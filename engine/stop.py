"""Stop requests (Ctrl-C, SIGTERM) that never land in the middle of a step or a save.

    signal --handler--> StopRequest flag --(trainer, at a step boundary)--> save, return

``llm-train`` installs its own handlers for SIGINT and SIGTERM whatever it inherited (a
background job of a non-interactive shell inherits SIGINT *ignored*; torchrun's agent
forwards signals to its workers), so a stop request always stops. Outside ``deferred()``
(loading data, training a tokenizer: nothing to save yet) a signal raises
KeyboardInterrupt at once, as Python normally does. Inside it, the first signal only sets
the flag; a second one aborts at once without saving (the last complete checkpoint stays
valid, saves being atomic) unless ``second_aborts`` is False (under torchrun, where the
launcher escalates to SIGKILL itself and forwards the terminal's Ctrl-C a second time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # the shell's code for "ended by SIGINT"


class StopRequest:
    """A flag set by a signal (or by ``request``), read by long loops at safe points."""

    def __init__(self) -> None:
        self.reason: str | None = None  # "SIGINT", "SIGTERM", or a caller's word
        self._deferring = False
        self._saved: dict[int, object] = {}
        self.on_first: Callable[[str], None] | None = None
        self.on_abort: Callable[[str], None] | None = None
        self.second_aborts = True

    def __bool__(self) -> bool:
        return self.reason is not None

    def request(self, reason: str = "request") -> None:
        """Ask the loop to stop at its next safe point (what a signal does)."""
        if self.reason is None:
            self.reason = reason

    # -- signal handlers -----------------------------------------------------------------

    def handle_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self._deferring:
            self.reason = self.reason or name  # remembered even if the exception is swallowed
            raise KeyboardInterrupt  # nothing to save yet: stop right here
        if self.reason is None:
            self.reason = name
            if self.on_first is not None:
                self.on_first(name)
        elif self.second_aborts:
            if self.on_abort is not None:
                self.on_abort(name)
            os._exit(EXIT_INTERRUPTED)  # no cleanup: an atomic save in flight is discarded

    def install(self) -> StopRequest:
        """Take over SIGINT and SIGTERM; ``uninstall`` restores them. Outside the main
        thread (where Python allows no handlers) this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._saved[sig] = signal.signal(sig, self.handle_signal)
        return self

    def uninstall(self) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()

    @contextlib.contextmanager
    def deferred(self):
        """Within this block signals only set the flag (the trainer acts on it). A stop
        requested before the block (whose KeyboardInterrupt some library code swallowed,
        say in a ``__del__``) stops here, before the block runs."""
        if self.reason is not None and not self._deferring:
            raise KeyboardInterrupt
        old, self._deferring = self._deferring, True
        try:
            yield self
        finally:
            self._deferring = old
