"""Applying learned merges to the bytes of one pre-token: the encoding half of BPE.

Rule (identical to ``tiktoken``): starting from the bytes, repeatedly merge the adjacent
pair whose concatenation is the token with the lowest rank (leftmost on ties) until no
adjacent concatenation is a token. The rank of a merged token is its id.

    >>> ranks = {(97, 97): 256, (256, 98): 257}  # 256 = "aa", 257 = "aab"
    >>> merge_bytes(b"aab", ranks), merge_bytes(b"aaab", ranks)
    ([257], [256, 97, 98])

Pieces up to 256 bytes use tiktoken's simple loop; longer ones a heap over a linked list,
so a 100,000-character run costs O(n log n), not O(n^2).
"""

from __future__ import annotations

import heapq
from itertools import repeat

__all__ = ["merge_bytes", "pair_ranks"]

_SMALL_PIECE = 256  # pieces up to this many bytes use the simple quadratic merge loop
_NO_RANK = 1 << 40  # larger than any rank


def pair_ranks(token_bytes: list[bytes], encoder: dict[bytes, int]) -> dict[tuple[int, int], int]:
    """(left, right) -> id of the token whose bytes are left + right, for every way of
    splitting every merged token into two tokens (tiktoken's rank semantics)."""
    pair_rank: dict[tuple[int, int], int] = {}
    for t in range(256, len(token_bytes)):
        tb = token_bytes[t]
        for cut in range(1, len(tb)):
            left = encoder.get(tb[:cut])
            if left is not None:
                right = encoder.get(tb[cut:])
                if right is not None:
                    pair_rank[(left, right)] = t
    return pair_rank


def merge_bytes(bs: bytes, pair_rank: dict[tuple[int, int], int]) -> list[int]:
    """Merge the bytes of one pre-token (at least two bytes) by rank; ``pair_rank`` comes
    from :func:`pair_ranks`."""
    get = pair_rank.get
    return _merge_short(bs, get) if len(bs) <= _SMALL_PIECE else _merge_long(bs, get)


def _merge_short(bs: bytes, get) -> list[int]:
    # tiktoken's loop: ranks[i] = rank of parts[i] + parts[i+1]; min() and
    # index() run in C, so each merge costs one short scan plus two lookups.
    parts = list(bs)
    ranks = list(map(get, zip(bs, bs[1:], strict=False), repeat(_NO_RANK)))
    while True:
        r = min(ranks)
        if r == _NO_RANK:
            return parts
        i = ranks.index(r)  # leftmost lowest rank
        parts[i] = r
        del parts[i + 1]
        del ranks[i]
        if i > 0:
            ranks[i - 1] = get((parts[i - 1], r), _NO_RANK)
        if i < len(ranks):
            ranks[i] = get((r, parts[i + 1]), _NO_RANK)
        elif not ranks:
            return parts


def _merge_long(bs: bytes, get) -> list[int]:
    # Long pre-token: doubly linked list of parts indexed by start byte offset, and a
    # heap of (rank, start). An entry is acted on only if the pair now starting there
    # still has that rank (otherwise it is stale); every live pair has an entry.
    n = len(bs)
    tok = list(bs)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []
    prev = tok[0]
    for i in range(1, n):
        x = tok[i]
        r = get((prev, x))
        if r is not None:
            heap.append((r, i - 1))
        prev = x
    heapq.heapify(heap)
    heappop, heappush = heapq.heappop, heapq.heappush
    while heap:
        r, i = heappop(heap)
        j = nxt[i]
        if j >= n or tok[i] < 0 or get((tok[i], tok[j])) != r:
            continue  # stale
        tok[i] = r
        tok[j] = -1
        k = nxt[j]
        nxt[i] = k
        if k < n:
            prv[k] = i
            r2 = get((r, tok[k]))
            if r2 is not None:
                heappush(heap, (r2, i))
        p = prv[i]
        if p >= 0:
            r2 = get((tok[p], r))
            if r2 is not None:
                heappush(heap, (r2, p))
    out = []
    i = 0
    while i < n:
        out.append(tok[i])
        i = nxt[i]
    return out
