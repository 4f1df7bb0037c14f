"""Counting pre-tokens for tokenizer training: in parallel, deterministic, bounded memory.

    texts --(cut into ~1 MB batches, in order)--> workers: normalize, split, count a batch
          --(merged in batch order)--> one Counter of pre-token -> occurrences

Counts are sums, so any split of the work gives the same totals. Memory is bounded by
pruning: when the merged table holds more than `MAX_PIECES` distinct pre-tokens, the rarest
are dropped (count below a threshold that doubles until at most half remain). Pruning
happens after fixed batches of the fixed batch order, so it too is the same for any number
of workers; on a corpus with fewer distinct pre-tokens than the cap it never happens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from ..worker_pool import batches, run_pool, worth_a_pool
from .tokenizer_config import NORMALIZERS, TokenizerError, compile_pattern

MAX_PIECES = 1 << 22  # distinct pre-tokens kept (~0.5 GB of Python strings and counts)

Progress = Callable[[int, int], None]

_WORKER: dict = {}  # per worker process: the normalizer and splitter built by `_init`


def _init(normalization: str, pattern: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _WORKER.update(_splitters(normalization, pattern))


def _splitters(normalization: str, pattern: str) -> dict:
    return {"normalize": NORMALIZERS[normalization], "findall": compile_pattern(pattern).findall}


def count_batch(
    texts: Iterable[str], normalize: Callable[[str], str], findall: Callable[[str], list]
) -> Counter:
    """How often each pre-token occurs in ``texts`` (normalized, then split): one batch of
    the counting below."""
    counts: Counter = Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{i} is {type(text).__name__}, not str")
        text = normalize(text)
        pieces = findall(text)
        if sum(map(len, pieces)) != len(text):
            raise TokenizerError("pattern skipped characters of a training text")
        counts.update(pieces)
    return counts


def _work(texts: list[str]) -> tuple[Counter, int]:
    return count_batch(texts, **_WORKER), sum(len(t) for t in texts)


def count_pretokens(
    texts: Iterable[str],
    normalization: str,
    pattern: str,
    workers: int = 1,
    progress: Progress | None = None,
    max_pieces: int = MAX_PIECES,
) -> Counter:
    """Pre-token counts of ``texts`` (see the module docstring).

    ``progress(chars_done, 0)`` is called after each batch (the total is unknown).
    """
    counts: Counter = Counter()
    workers, cut = worth_a_pool(batches(texts), workers)
    if workers <= 1:
        split = _splitters(normalization, pattern)
        results = ((count_batch(b, **split), sum(map(len, b))) for b in cut)
    else:
        results = run_pool(_work, _init, (normalization, pattern), cut, workers)
    done = 0
    for part, chars in results:
        if counts:
            counts.update(part)
        else:
            counts = part
        if len(counts) > max_pieces:
            counts = prune(counts, max_pieces // 2)
        done += chars
        if progress is not None:
            progress(done, 0)
    return counts


def prune(counts: Counter, keep: int) -> Counter:
    """Drop the rarest pre-tokens until at most ``keep`` remain: everything below a count
    threshold that starts at 2 and doubles (ties are all kept or all dropped).

    ``prune(Counter(a=5, b=1, c=1, d=3), 2)`` -> ``Counter({'a': 5, 'd': 3})``.
    """
    threshold = 2
    while len(counts) > keep:
        counts = Counter({p: c for p, c in counts.items() if c >= threshold})
        threshold *= 2
    return counts
