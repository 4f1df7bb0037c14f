"""Learning byte-level BPE merges: the training half of :mod:`.tokenizer`.

Input: the unique pre-tokens of a corpus as lists of byte ids ("words") and how often each
occurs. Output: the merges in the order they were learned; merge ``r`` creates token
``256 + r``.

Tie rule (the one total order used to pick each merge)::

    the pair with the highest count wins; among equal counts, the smallest pair of ids
    (left id, then right id) wins.

    >>> words, freqs = words_from_counts({"aaabdaaabac": 1})
    >>> learn_merges(words, freqs, num_merges=3, min_frequency=1)
    [(97, 97), (97, 98), (256, 257)]

``(97, 97)`` counts 4; then ``(97, 98)`` and ``(256, 97)`` both count 2 and the smaller
pair ``(97, 98)`` wins; then ``(256, 257)``.

Nothing is recounted from scratch: after each merge only the words that held the merged
pair are rewritten, and the counts of exactly the pairs that appear or disappear in them
change. The next pair comes from a heap whose stale entries are fixed when popped.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Mapping

__all__ = ["MAX_VOCAB", "learn_merges", "words_from_counts"]

# A pair (left, right) is one int, key = left << 20 | right (ids stay below 2**20), so
# comparing keys compares (left, right) lexicographically.
SHIFT = 20
MAX_VOCAB = 1 << SHIFT  # ids must fit in SHIFT bits
_MASK = MAX_VOCAB - 1

Progress = Callable[[int, int], None]


def words_from_counts(piece_counts: Mapping[str, int]) -> tuple[list[list[int]], list[int]]:
    """Pre-token counts -> (words as byte-id lists, their counts), in a fixed order.

    Sorted by string (never hash order); one-byte pieces are left out (nothing to merge):
    ``{"b": 5, "ab": 2}`` -> ``([[97, 98]], [2])``.
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece in sorted(piece_counts):
        bs = piece.encode("utf-8")
        if len(bs) >= 2:
            words.append(list(bs))
            freqs.append(piece_counts[piece])
    return words, freqs


def learn_merges(
    words: list[list[int]],
    freqs: list[int],
    num_merges: int,
    min_frequency: int,
    progress: Progress | None = None,
) -> list[tuple[int, int]]:
    """Learn up to ``num_merges`` merges from unique words (byte-id lists) and counts.

    Keeps: ``counts`` (pair key -> weighted count), ``where`` (pair key -> indices of words
    that contained it; stale members are skipped), a max-heap of ``(-count, key)`` with lazy
    refresh (an entry whose count is out of date is re-pushed with the current count when
    popped; after every count increase a fresh entry is pushed). ``key = left << 20 | right``
    so heap order is exactly the tie rule: highest count, then smallest (left, right).
    A merge whose bytes equal an existing token reuses that token's id (no new id).
    ``words`` is rewritten in place. ``progress(done, total)`` is called about 200 times.
    """
    counts, where = _count_pairs(words, freqs)
    heap = _candidate_heap(counts, min_frequency)
    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    bytes_to_id: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int]] = []
    report_every = max(1, num_merges // 200)
    while len(merges) < num_merges:
        key = _pop_best(heap, counts, min_frequency)
        if key is None:
            break
        # (a, b) is the most frequent pair: merge it into token m everywhere.
        a, b = key >> SHIFT, key & _MASK
        mb = token_bytes[a] + token_bytes[b]
        m = bytes_to_id.get(mb)
        if m is None:
            m = len(token_bytes)
            token_bytes.append(mb)
            bytes_to_id[mb] = m
            merges.append((a, b))
            if progress is not None and (len(merges) % report_every == 0):
                progress(len(merges), num_merges)
        grown = _merge_everywhere(key, m, words, freqs, counts, where)
        for k in grown:  # counts that grew get a fresh entry (the heap invariant)
            c = counts[k]
            if c >= min_frequency:
                heapq.heappush(heap, (-c, k))
    if progress is not None:
        progress(len(merges), num_merges)
    return merges


def _count_pairs(
    words: list[list[int]], freqs: list[int]
) -> tuple[dict[int, int], defaultdict[int, set[int]]]:
    """Count every adjacent pair and index the words holding it.

    counts[key]: occurrences of the pair over all words, each weighted by its word's
      frequency. Kept exact: every merge updates it incrementally.
    where[key]: indices of the words that contain (or once contained) the pair. Only
      ever grows, except that the merged pair's set is popped; members that no longer
      hold the pair are found stale by scanning the word, and skipped.

    ``words=[[1, 2, 1, 2]], freqs=[3]``: pair (1, 2) counts 6 and (2, 1) counts 3 (stored
    under their keys ``1 << 20 | 2`` and ``2 << 20 | 1``); both are indexed under word 0.
    """
    S = SHIFT
    counts: dict[int, int] = {}
    where: defaultdict[int, set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        prev = w[0]
        for x in w[1:]:
            k = (prev << S) | x
            counts[k] = counts.get(k, 0) + f
            where[k].add(wi)
            prev = x
    return counts, where


def _candidate_heap(counts: dict[int, int], min_frequency: int) -> list[tuple[int, int]]:
    """The heap of merge candidates: ``(-count, key)`` for every frequent enough pair.

    heapq is a min-heap, so the top is the highest count and, among equal counts, the
    smallest key: exactly the tie rule.
    Lazy invalidation: counts change without touching the heap, so an entry may be out
    of date. Invariant: every pair with count >= min_frequency has an entry whose stored
    count is >= its true count (a decrease leaves the old, higher entry in place; an
    increase pushes a fresh entry). Hence an entry that is popped and still current is
    the true maximum; a popped stale entry is pushed back with its current count.
    """
    heap = [(-c, k) for k, c in counts.items() if c >= min_frequency]
    heapq.heapify(heap)
    return heap


def _pop_best(
    heap: list[tuple[int, int]], counts: dict[int, int], min_frequency: int
) -> int | None:
    """The key of the pair to merge next (the tie rule's first), or None when none is
    frequent enough."""
    heappop, heappush = heapq.heappop, heapq.heappush
    while heap:
        negc, key = heappop(heap)
        c = counts.get(key, 0)
        if c == -negc:  # current: the true maximum (see _candidate_heap)
            return key if c >= min_frequency else None
        if c >= min_frequency:  # stale: requeue with the current count (dropped if now too rare)
            heappush(heap, (-c, key))
    return None


def _merge_everywhere(
    key: int,
    m: int,
    words: list[list[int]],
    freqs: list[int],
    counts: dict[int, int],
    where: defaultdict[int, set[int]],
) -> dict[int, None]:
    """Replace the pair ``key`` by token ``m`` in every word that holds it.

    Returns the pairs whose count grew (they need a fresh heap entry); a dict keeps them
    unique in insertion order (deterministic).
    """
    a, b = key >> SHIFT, key & _MASK
    grown: dict[int, None] = {}
    for wi in where.pop(key, ()):
        w = words[wi]
        n = len(w)
        # find the first occurrence quickly (list.index runs in C); stale index entries
        # have none
        i = 0
        found = False
        while True:
            try:
                i = w.index(a, i)
            except ValueError:
                break
            if i + 1 < n and w[i + 1] == b:
                found = True
                break
            i += 1
        if not found:
            continue
        words[wi] = _rewrite_word(w, wi, i, key, m, freqs[wi], counts, where, grown)
    return grown


def _rewrite_word(
    w: list[int],
    wi: int,
    i: int,
    key: int,
    m: int,
    f: int,
    counts: dict[int, int],
    where: defaultdict[int, set[int]],
    grown: dict[int, None],
) -> list[int]:
    """Word ``wi`` (``w``) with each non-overlapping (a, b) from index ``i`` on replaced by
    ``m``.

    Updates ``counts`` for exactly the pairs that appear or disappear, weighted by the
    word's frequency ``f``; pairs that gain go into ``grown``. For "x a b y": (x, a),
    (a, b) and (b, y) lose f; (x, m) and (m, y) gain f.
    The word is indexed in ``where`` under every new pair it now holds (the pairs
    involving m); the pairs it lost keep it as a stale member, skipped when they merge.
    """
    S = SHIFT
    a, b = key >> S, key & _MASK
    n = len(w)
    nw = w[:i]
    last_end = -1  # index just past the latest merge in this word
    while i < n:
        x = w[i]
        if x == a and i + 1 < n and w[i + 1] == b:
            counts[key] -= f
            # Left neighbour pair (w[i-1], a) disappears, unless the previous merge
            # ended right here: then that pair was (b, a), already taken off below
            # as the previous merge's right neighbour.
            if i > 0 and last_end != i:
                k = (w[i - 1] << S) | a
                counts[k] -= f
            # Right neighbour pair (b, w[i+2]) disappears. (For "a a a" merging
            # (a, a) this is the overlapping (a, a) itself, correctly removed.)
            if i + 2 < n:
                k = (b << S) | w[i + 2]
                counts[k] -= f
            # New pair with what is now on the left: a plain token or, after an
            # adjacent merge, m itself (the pair (m, m)).
            if nw:
                k = (nw[-1] << S) | m
                counts[k] = counts.get(k, 0) + f
                grown[k] = None
                where[k].add(wi)
            nw.append(m)
            i += 2
            last_end = i
        else:
            if last_end == i:  # first token after a merge: new pair (m, x)
                k = (m << S) | x
                counts[k] = counts.get(k, 0) + f
                grown[k] = None
                where[k].add(wi)
            nw.append(x)
            i += 1
    return nw
