"""Where training batches come from: pretraining windows or whole chats, seeded per step.

    token cache --batch_source()--> PretrainWindows | ChatBatches   (one "item" = one row)
    StepPlanner: optimizer step s --> this rank's grad_accum micro-batches + global counts
    Prefetcher:  builds step s + 1 on a worker thread while step s runs

Reproducibility: the i-th training example of the run is fixed by (seed, i) alone (each
epoch is a seeded permutation of the items), so a data position is one integer and the
batches of step s are a pure function of s. That is what makes resume exact and lets
W processes with batch b see the examples of one process with batch W * b.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..data.token_cache import TokenCache
from ..model.transformer import IGNORE_INDEX
from .train_config import TrainingError


@dataclass
class Batch:
    """One micro-batch: inputs, shifted targets (-100 = ignored), row lengths."""

    idx: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    lengths: torch.Tensor | None  # [B] int64 or None (all rows full)
    n_targets: int  # kept targets, counted on the host when the batch is built

    def to(self, device: torch.device) -> Batch:
        if device.type != "cuda":
            return self
        # Pinned host memory lets the copy overlap with the running step.
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.idx), move(self.targets), move(self.lengths), self.n_targets)


class EpochSampler:
    """Maps a global example position p to a training item: epoch p // n, then a seeded
    permutation of range(n) for that epoch. Stateless, so a data position is one integer.

    >>> s = EpochSampler(4, seed=0)
    >>> sorted(s.items(0, 4)[1]) == [0, 1, 2, 3]    # one epoch covers every item once
    True
    """

    def __init__(self, n_items: int, seed: int):
        if n_items <= 0:
            raise TrainingError("no training items to sample from")
        self.n, self.seed = n_items, seed
        self._perm: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perm[epoch] = rng.permutation(self.n)
        return self._perm[epoch]

    def items(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, item indices) of global positions start .. start + count - 1."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.n
        idx = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._permutation(int(e))[pos[sel] % self.n]
        return epochs, idx


class PretrainWindows:
    """Fixed windows of seq_len + 1 tokens over a pretraining token cache.

    The last ``val_fraction`` of the tokens (moved forward to a document start when that
    leaves enough tokens) are the validation split, read as consecutive windows. Training
    windows start at ``shift_e + i * seq_len`` where ``shift_e`` in [0, seq_len) is drawn
    per epoch, so successive epochs see differently cut windows.
    """

    kind = "pretrain"

    def __init__(self, cache: TokenCache, seq_len: int, val_fraction: float, seed: int):
        if cache.kind != "pretrain":
            raise TrainingError(f"{cache.path}: expected a pretraining token cache")
        self.cache, self.T, self.seed = cache, seq_len, seed
        n, need = cache.n_tokens, seq_len + 1
        n_val = max(need, int(round(n * val_fraction))) if val_fraction > 0 else 0
        split = n - n_val
        if n_val and split < need:
            raise TrainingError(
                f"the corpus has {n} tokens: too few for seq_len {seq_len} with a validation "
                f"split (need at least {2 * need}); add data, lower --seq-len or val_fraction"
            )
        if not n_val and n < need:
            raise TrainingError(
                f"the corpus has {n} tokens: too few for one window of seq_len {seq_len} + 1"
            )
        if n_val:  # snap to the next document start when both sides stay large enough
            offs = cache.doc_offsets
            j = int(np.searchsorted(offs, split, side="left"))
            if j < len(offs) - 1 and n - int(offs[j]) >= need:
                split = int(offs[j])
        self.split = split
        self.n_val_tokens = n - split
        self.shift = (split - seq_len) // seq_len >= 1  # room for a per-epoch shift
        self.n_train = (split - seq_len) // seq_len if self.shift else 1
        self.n_val = self.n_val_tokens // need if n_val else 0
        self.val_bytes = self._val_bytes()

    def _val_bytes(self) -> float:
        """UTF-8 bytes of the validation split (a cut document counts pro rata)."""
        if not self.n_val:
            return 0.0
        c = self.cache
        j = int(np.searchsorted(c.doc_offsets, self.split, side="right")) - 1
        doc_len = int(c.doc_offsets[j + 1] - c.doc_offsets[j])
        inside = (int(c.doc_offsets[j + 1]) - self.split) / max(1, doc_len)
        return float(c.doc_bytes[j + 1 :].sum()) + inside * float(c.doc_bytes[j])

    def _windows(self, starts: np.ndarray) -> Batch:
        tok = self.cache.tokens
        rows = np.stack([np.asarray(tok[s : s + self.T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), None, len(starts) * self.T)

    def counts(self, items: np.ndarray) -> tuple[int, int]:
        """(kept targets, input tokens) of these items: every window is full."""
        return len(items) * self.T, len(items) * self.T

    def train_batch(self, epochs: np.ndarray, items: np.ndarray) -> Batch:
        shifts = np.zeros_like(epochs)
        if self.shift:
            for e in np.unique(epochs):
                shifts[epochs == e] = np.random.default_rng([self.seed, int(e), 1]).integers(self.T)
        return self._windows(shifts + items * self.T)

    def val_batch(self, items: np.ndarray) -> Batch:
        return self._windows(self.split + items * (self.T + 1))

    def bits_per_byte(self, loss_nats: float) -> float | None:
        """loss * tokens / (ln 2 * bytes) over the validation split."""
        if not self.val_bytes:
            return None
        return loss_nats * self.n_val_tokens / (math.log(2) * self.val_bytes)


class ChatBatches:
    """Whole conversations (truncated to seq_len + 1 tokens) with the assistant mask,
    right-padded to the longest in the batch. The last ``val_fraction`` of them (at least
    one, when val_fraction > 0 and there are two or more) are the validation split."""

    kind = "sft"

    def __init__(self, cache: TokenCache, seq_len: int, val_fraction: float, seed: int, pad_id=0):
        if cache.kind != "sft" or cache.mask is None:
            raise TrainingError(f"{cache.path}: expected a chat (sft) token cache")
        self.cache, self.T, self.seed, self.pad_id = cache, seq_len, seed, pad_id
        n = cache.n_docs
        n_val = 0
        if val_fraction > 0 and n >= 2:
            n_val = min(n - 1, max(1, int(round(n * val_fraction))))
        self.n_train, self.n_val = n - n_val, n_val
        if self.n_train < 1:
            raise TrainingError("no conversations to train on")

    def _span(self, doc: int) -> tuple[int, int]:
        """Token range of a conversation, cut to seq_len + 1 tokens."""
        a, b = int(self.cache.doc_offsets[doc]), int(self.cache.doc_offsets[doc + 1])
        return a, min(b, a + self.T + 1)

    def counts(self, items: np.ndarray) -> tuple[int, int]:
        """(kept targets, input tokens) of these training items, without building them."""
        targets = tokens = 0
        for d in items:
            a, b = self._span(int(d))
            targets += int(np.count_nonzero(self.cache.mask[a + 1 : b]))
            tokens += b - a - 1
        return targets, tokens

    def _rows(self, docs: np.ndarray) -> Batch:
        c = self.cache
        spans = [self._span(int(d)) for d in docs]
        width = max(b - a - 1 for a, b in spans)
        idx = np.full((len(spans), width), self.pad_id, dtype=np.int64)
        tgt = np.full((len(spans), width), IGNORE_INDEX, dtype=np.int64)
        lengths = np.zeros(len(spans), dtype=np.int64)
        for r, (a, b) in enumerate(spans):
            ids = np.asarray(c.tokens[a:b], dtype=np.int64)
            mask = np.asarray(c.mask[a:b], dtype=bool)
            L = b - a - 1
            idx[r, :L] = ids[:-1]
            tgt[r, :L] = np.where(mask[1:], ids[1:], IGNORE_INDEX)  # train on answers only
            lengths[r] = L
        full = bool((lengths == width).all())
        n_targets = int((tgt != IGNORE_INDEX).sum())
        lt = None if full else torch.from_numpy(lengths)
        return Batch(torch.from_numpy(idx), torch.from_numpy(tgt), lt, n_targets)

    def train_batch(self, epochs: np.ndarray, items: np.ndarray) -> Batch:
        return self._rows(items)

    def val_batch(self, items: np.ndarray) -> Batch:
        return self._rows(self.n_train + items)

    def bits_per_byte(self, loss_nats: float) -> float | None:
        return None  # the loss covers assistant tokens only; bytes per token is undefined


def batch_source(cache: TokenCache, phase: str, seq_len: int, val_fraction: float, seed: int,
                 pad_id: int = 0) -> PretrainWindows | ChatBatches:  # fmt: skip
    """The batch source for a token cache, checked against the phase that trains on it."""
    if cache.kind != phase:
        raise TrainingError(f"phase {phase!r} cannot train on a {cache.kind!r} token cache")
    if cache.kind == "pretrain":
        return PretrainWindows(cache, seq_len, val_fraction, seed)
    return ChatBatches(cache, seq_len, val_fraction, seed, pad_id)


# ----------------------------------------------------------------------------- steps


@dataclass
class StepBatches:
    """This rank's micro-batches of one optimizer step, and the counts of the whole global
    step (all ranks, all micro-steps) that weight each micro-batch's loss."""

    micro: list[Batch]
    global_targets: int
    global_tokens: int


class StepPlanner:
    """Which examples each rank trains on at each optimizer step.

    Global example positions of step s are laid out micro-step major, rank minor, so
    ``world_size`` ranks with batch b see exactly the examples of one process with batch
    ``world_size * b``. Counts of the whole global step come from the source (cheap, no
    communication between ranks).
    """

    def __init__(self, source, batch_size: int, grad_accum: int, seed: int, rank=0, world=1):
        self.source, self.b, self.accum = source, batch_size, grad_accum
        self.rank, self.world = rank, world
        self.per_step = batch_size * grad_accum * world
        self.sampler = EpochSampler(source.n_train, seed)

    def step(self, step: int) -> StepBatches:
        epochs, items = self.sampler.items(step * self.per_step, self.per_step)
        targets, tokens = self.source.counts(items)
        micro = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.b  # this rank's slice of micro-step m
            micro.append(self.source.train_batch(epochs[lo : lo + self.b], items[lo : lo + self.b]))
        return StepBatches(micro, targets, tokens)


class Prefetcher:
    """Builds the batches of the next step on a worker thread while this one trains.

    Batches are a pure function of the step, so prefetching changes no result.
    """

    def __init__(self, planner: StepPlanner, device: torch.device):
        self.planner, self.device = planner, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.pending: tuple[int, Future] | None = None

    def _build(self, step: int) -> StepBatches:
        sb = self.planner.step(step)
        sb.micro = [bt.to(self.device) for bt in sb.micro]
        return sb

    def get(self, step: int, next_step: int | None) -> StepBatches:
        """Batches of ``step``; starts building ``next_step`` (None: nothing more)."""
        if self.pending is not None and self.pending[0] == step:
            out = self.pending[1].result()
        else:
            out = self._build(step)
        self.pending = None
        if next_step is not None:
            self.pending = (next_step, self.pool.submit(self._build, next_step))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None
