"""Packing conversations into fixed-width rows (``llm-train --pack``).

Padding every conversation to the longest of its batch wastes most of the compute on short
chats. Packed, a row of T positions holds several whole conversations back to back, each a
document of its own (attention never crosses a boundary; see kernels.attention), so the
model sees exactly what it would see for each conversation alone.

A conversation of n tokens takes n - 1 positions (inputs are tokens[:-1], targets
tokens[1:]). One longer than a row (n > T + 1) is split at turn boundaries (where an
assistant answer ends and the next message begins) into pieces that fit; a single turn
longer than a row is cut inside, the next piece repeating the last token of the previous
one so that no target is lost. Pieces are shuffled with the seed, then placed first-fit:
each goes into the first row with room, else opens a new row. The packing is computed once
per run from (data, seq_len, seed), so a row index is a pure function of those and resume
and DDP keep working unchanged (a row is one "item" of the epoch sampler).

    >>> mask = np.array([0, 0, 1, 1, 0, 0, 1, 1])   # two turns: answers at 2-3 and 6-7
    >>> split_at_turns(mask, 0, 8, limit=5)
    ([(0, 4), (4, 8)], False)
    >>> first_fit([3, 2, 4, 1], capacity=5, order=[0, 1, 2, 3])
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def split_at_turns(mask: np.ndarray, a: int, b: int, limit: int) -> tuple[list, bool]:
    """Token spans of conversation [a, b), each at most `limit` tokens, cut where an answer
    ends (mask 1 -> 0) when possible; the flag says whether a turn had to be cut inside."""
    if b - a <= limit:
        return [(a, b)], False
    m = np.asarray(mask[a:b], dtype=bool)
    turns = (np.flatnonzero(m[:-1] & ~m[1:]) + 1 + a).tolist() + [b]  # next-turn starts
    pieces, start, cut = [], a, False
    while b - start > 1:
        fits = [p for p in turns if start < p <= start + limit]
        if fits:
            end = max(fits)
            pieces.append((start, end))
            start = end
        else:  # one turn longer than a row: cut it, overlapping one token (its target)
            end = start + limit
            pieces.append((start, end))
            start, cut = end - 1, True
    return pieces, cut


def first_fit(sizes: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Rows of item indices: items in `order`, each into the first row with room."""
    free = np.empty(0, dtype=np.int64)
    rows: list[list[int]] = []
    for i in order:
        room = np.flatnonzero(free >= sizes[i])
        if room.size:
            r = int(room[0])
        else:
            r = len(rows)
            rows.append([])
            free = np.append(free, capacity)
        rows[r].append(int(i))
        free[r] -= sizes[i]
    return rows


@dataclass
class Packing:
    """Rows of token spans, and what splitting did (for the run summary)."""

    rows: list[list[tuple[int, int]]]
    n_split: int  # conversations longer than a row
    n_pieces: int  # pieces they became
    n_cut_inside: int  # of those, conversations with a turn longer than a row


def pack_conversations(offsets: np.ndarray, mask: np.ndarray, docs: range, seq_len: int,
                       seed: int | None) -> Packing:  # fmt: skip
    """Pack conversations `docs` of a chat token cache into rows of `seq_len` positions;
    `seed` None keeps their order (validation), else a seeded shuffle before first-fit."""
    spans: list[tuple[int, int]] = []
    n_split = n_pieces = n_cut = 0
    for d in docs:
        pieces, cut = split_at_turns(mask, int(offsets[d]), int(offsets[d + 1]), seq_len + 1)
        pieces = [(a, b) for a, b in pieces if b - a >= 2]  # a 1-token span has no target
        if len(pieces) > 1:
            n_split, n_pieces, n_cut = n_split + 1, n_pieces + len(pieces), n_cut + int(cut)
        spans += pieces
    sizes = [b - a - 1 for a, b in spans]
    order = (
        range(len(spans))
        if seed is None
        else np.random.default_rng([seed, 2]).permutation(len(spans))
    )
    rows = [[spans[i] for i in row] for row in first_fit(sizes, seq_len, order)]
    return Packing(rows, n_split, n_pieces, n_cut)
