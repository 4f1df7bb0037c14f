"""How many CPU threads torch uses for inference (llm-chat, llm-serve, llm-eval).

Why not torch's default (one per core): a decode step of a small model is a few hundred
tiny ops, and every one of them ends at an OpenMP barrier. When another process keeps one
core busy (a browser, a build, another model), the thread that landed on that core arrives
late at every barrier and the whole step waits for it. Measured on a 2-core machine
(benchmarks/RESULTS.md, "Threads"): 2 threads decoded `seed` 7-10x SLOWER than 1 thread,
with and without an extra busy process. One thread never falls off that cliff, so it is the
default; ``--threads N`` asks for more (a long prefill on an idle machine can gain).
"""

from __future__ import annotations

import os

from .errors import SettingError

__all__ = ["DEFAULT_INFERENCE_THREADS", "resolve_threads", "use_threads"]

DEFAULT_INFERENCE_THREADS = 1


def resolve_threads(requested: int | None, cores: int | None = None) -> int:
    """The thread count to use: ``requested`` (1..cores) or the measured default.

    >>> resolve_threads(None), resolve_threads(2, cores=4)
    (1, 2)
    """
    cores = (os.cpu_count() or 1) if cores is None else cores
    if requested is None:
        return min(DEFAULT_INFERENCE_THREADS, cores)
    if not 1 <= requested <= cores:
        raise SettingError(f"threads {requested}: give 1..{cores} (this machine's CPU cores)",
                           field="threads")  # fmt: skip
    return requested


def use_threads(n: int) -> None:
    """Set torch's intra-op threads for this process (inter-op pools are left alone)."""
    import torch  # here: the CLIs read the default above before they import torch

    torch.set_num_threads(n)
