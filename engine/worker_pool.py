"""Ordered work on a pool of spawned processes, in bounded memory: shared by the token-cache
encoder (tokenizer/parallel_encode.py) and the pre-token counter (tokenizer/pretoken_count.py).

    items --(main: cut into batches, in order)--> workers, one batch each
          --(main: results taken back in submission order)--> caller

Workers are started with ``spawn`` (a fork after torch is imported can deadlock); at most
``2 x workers`` batches are in flight, so memory does not grow with the input.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice

BATCH_CHARS = 1 << 20  # characters of text per batch sent to a worker
BATCH_DOCS = 4096  # at most this many documents per batch


def batches(docs: Iterable[str], max_chars: int | None = None) -> Iterator[list[str]]:
    """Cut a document stream into lists of about ``max_chars`` characters, in order.

    ``["ab", "cd", "e"]`` with ``max_chars=4`` -> ``[["ab", "cd"], ["e"]]``.
    """
    max_chars = max_chars or BATCH_CHARS
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def worth_a_pool(items: Iterable, workers: int) -> tuple[int, Iterator]:
    """(workers, the same items): 1 worker when there is a single item, whose start-up
    time a pool would only add (the bundled corpus is one batch)."""
    it = iter(items)
    head = list(islice(it, 2))
    return (workers if len(head) > 1 else 1), chain(head, it)


def run_pool(work, init, initargs, items: Iterable, workers: int) -> Iterator:
    """``work(item)`` for each item on ``workers`` spawned processes, results in order,
    at most ``2 x workers`` in flight. Leaving early (an error, Ctrl-C, a closed
    generator) cancels what is queued and waits for the workers to end."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=initargs)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """All the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
