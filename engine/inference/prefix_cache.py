"""A prefix cache for the scheduler: keys and values of token sequences seen before, so a
new prompt that starts with them (the earlier turns of a chat, a shared system prompt or
few-shot preamble) is prefilled from where they end instead of from the start.

Entries are token sequences with their K/V for every layer ([Hkv, T, Dh] each, copies on
the cache's device). A lookup takes the longest common prefix of the prompt with any entry
(not only a whole entry: the K/V of a sequence's first m tokens are those of any sequence
that starts with the same m tokens, since attention is causal); at least ``min_match``
tokens, and at most all but the prompt's last token (whose logits are needed). Memory is
bounded by ``max_tokens`` tokens in all, freed least recently used first. An entry that is
a prefix of a newer one is dropped (a chat's turns keep one entry, its longest).

    >>> cache = PrefixCache(max_tokens=4096)
    >>> cache.store([1, 2, 3, 4], k, v)                        # doctest: +SKIP
    >>> cache.lookup([1, 2, 3, 9])                             # doctest: +SKIP
    Match(length=3, k=[...], v=[...])
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Match", "PrefixCache", "PrefixStats"]


class Match(NamedTuple):
    """``length`` reusable tokens; their K/V are the first ``length`` slots of k[l], v[l]."""

    length: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0  # prompt tokens not recomputed thanks to the cache
    evictions: int = 0


@dataclass
class _Entry:
    tokens: np.ndarray
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.tokens)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays.

    >>> common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5]))
    2
    """
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """LRU store of token prefixes and their K/V (see the module docstring). Not
    thread-safe: the scheduler thread owns it."""

    def __init__(self, max_tokens: int, min_match: int = 8):
        if max_tokens < 1 or min_match < 1:
            raise ValueError(f"need max_tokens >= 1 and min_match >= 1, got {max_tokens}, "
                             f"{min_match}")  # fmt: skip
        self.max_tokens, self.min_match = max_tokens, min_match
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._ids = 0
        self.tokens = 0  # tokens held, <= max_tokens
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> Match | None:
        """The longest reusable prefix of ``prompt``, or None (too short or no entry)."""
        self.stats.lookups += 1
        want = np.asarray(prompt[:-1], dtype=np.int64)  # the last token is always computed
        best, best_key = 0, None
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, want)
            if n > best:
                best, best_key = n, key
        if best_key is None or best < self.min_match:
            return None
        self._entries.move_to_end(best_key)
        entry = self._entries[best_key]
        self.stats.hits += 1
        self.stats.hit_tokens += best
        return Match(best, entry.k, entry.v)

    def store(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep ``tokens`` with their K/V (k[l], v[l]: [Hkv, >= len(tokens), Dh], copied
        here). Entries it extends are dropped; if an entry already extends it, that entry is
        only marked as recently used."""
        n = len(tokens)
        if n < self.min_match or n > self.max_tokens:
            return
        ids = np.asarray(tokens, dtype=np.int64)
        for key, entry in list(self._entries.items()):
            shared = common_prefix(entry.tokens, ids)
            if shared == n:  # already held (as a whole entry or a prefix of one)
                self._entries.move_to_end(key)
                return
            if shared == entry.size:  # the new sequence extends this entry
                self._drop(key)
        while self.tokens + n > self.max_tokens:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        copy = [t[:, :n].clone() for t in k], [t[:, :n].clone() for t in v]
        self._ids += 1
        self._entries[self._ids] = _Entry(ids, *copy)
        self.tokens += n

    def _drop(self, key: int) -> None:
        self.tokens -= self._entries.pop(key).size
