"""Driving a real program in a test: start it, wait for a moment of its run, signal it,
and never leave it running whatever the test's outcome."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HANG_GUARD_S = 120.0  # how long a moment may take to come: a hang guard, not a timing test


@contextlib.contextmanager
def running(argv, **kw) -> Iterator[subprocess.Popen]:
    """Popen with text pipes; killed on the way out if it is still running."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_until(proc: subprocess.Popen, moment: Callable[[], bool], poll: float = 0.05) -> None:
    """Return once ``moment()`` is true; fail if the program ends first or never gets there."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not moment():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the program never reached the awaited moment"
        time.sleep(poll)


def signal_and_wait(proc: subprocess.Popen, *signals: int) -> str:
    """Send the signals, wait for the program to end, return its stderr."""
    for sig in signals:
        proc.send_signal(sig)
    return proc.communicate(timeout=HANG_GUARD_S)[1]


def saved_step(out: Path) -> int:
    """The step of the checkpoint in ``out``, or -1 (none yet, or being swapped right now)."""
    from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
    from tritonlm.engine.checkpoint.save_load import load_checkpoint

    try:
        return load_checkpoint(out).trainer_state["step"]
    except CheckpointError:
        return -1
