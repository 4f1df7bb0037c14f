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
from .packing import pack_conversations
from .train_config import TrainingError


@dataclass
class Batch:
    """One micro-batch: inputs, shifted targets (-100 = ignored), row lengths, and the
    document of every position (packed rows / document masking; None: one per row)."""

    idx: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    lengths: torch.Tensor | None  # [B] int64 or None (all rows full)
    n_targets: int  # kept targets, counted on the host when the batch is built
    document_ids: torch.Tensor | None = None  # [B, T] int32

    def to(self, device: torch.device) -> Batch:
        if device.type != "cuda":
            return self
        # Pinned host memory lets the copy overlap with the running step.
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.idx), move(self.targets), move(self.lengths), self.n_targets,
                     move(self.document_ids))  # fmt: skip


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

    ``doc_mask``: each window carries the document id of every position (from the cache's
    document offsets), so attention stays inside documents and RoPE restarts at each.
    """

    kind = "pretrain"
    notes: list[str] = []  # nothing to report: every window is full

    def __init__(self, cache: TokenCache, seq_len: int, val_fraction: float, seed: int,
                 doc_mask: bool = False):  # fmt: skip
        if cache.kind != "pretrain":
            raise TrainingError(f"{cache.path}: expected a pretraining token cache")
        self.cache, self.T, self.seed, self.doc_mask = cache, seq_len, seed, doc_mask
        n, need = cache.n_tokens, seq_len + 1
        n_val = max(need, int(round(n * val_fraction))) if val_fraction > 0 else 0
        split = n - n_val
        if n_val and split < need:
            raise TrainingError(
                f"the corpus has {n} tokens: too few for seq_len {seq_len} with a validation "
                f"split (need at least {2 * need}); add data, lower `seq_len` or `val_fraction`"
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
        docs = None
        if self.doc_mask:  # document of each input position: the offset at or before it
            pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.T)
            ids = np.searchsorted(self.cache.doc_offsets, pos, side="right") - 1
            docs = torch.from_numpy(ids.astype(np.int32))
        n = len(starts) * self.T
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), None, n, docs)

    def counts(self, items: np.ndarray) -> tuple[int, int]:
        """(kept targets, input tokens) of these items: every window is full."""
        return len(items) * self.T, len(items) * self.T

    def positions(self, items: np.ndarray) -> int:
        """Positions (tokens plus padding) of one micro-batch of these items."""
        return len(items) * self.T

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
    one, when val_fraction > 0 and there are two or more) are the validation split.

    ``pack``: items are rows of seq_len positions packed with whole conversations instead
    (engine.train.packing; long ones split at turn boundaries, nothing dropped), each row
    carrying document ids; the splits are made of conversations as above."""

    kind = "sft"

    def __init__(self, cache: TokenCache, seq_len: int, val_fraction: float, seed: int,
                 pad_id=0, pack: bool = False):  # fmt: skip
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
        self.pack, self.n_conversations = pack, self.n_train
        lengths = np.diff(np.asarray(cache.doc_offsets[: self.n_train + 1], dtype=np.int64))
        long = int(np.count_nonzero(lengths > seq_len + 1))
        self.notes = [] if pack or not long else [
            f"{long} of {self.n_train} training conversations cut at seq_len + 1 = "
            f"{seq_len + 1} tokens (their rest is not trained on; `pack` keeps it)"
        ]  # fmt: skip
        if pack:
            offs, mask = cache.doc_offsets, cache.mask
            train = pack_conversations(offs, mask, range(self.n_train), seq_len, seed)
            val = pack_conversations(offs, mask, range(self.n_train, n), seq_len, None)
            self.rows = train.rows + val.rows
            self.n_train, self.n_val = len(train.rows), len(val.rows)
            self._row_counts = [self._packed_counts(r) for r in self.rows]
            if train.n_split:
                inside = (
                    f", {train.n_cut_inside} with a turn cut inside" if train.n_cut_inside else ""
                )
                self.notes.append(
                    f"{train.n_split} of {self.n_conversations} training conversations longer "
                    f"than a row split at turn boundaries into {train.n_pieces} pieces{inside}"
                )

    def _span(self, doc: int) -> tuple[int, int]:
        """Token range of a conversation, cut to seq_len + 1 tokens."""
        a, b = int(self.cache.doc_offsets[doc]), int(self.cache.doc_offsets[doc + 1])
        return a, min(b, a + self.T + 1)

    def _packed_counts(self, spans) -> tuple[int, int]:
        """(kept targets, input tokens) of one packed row."""
        m = self.cache.mask
        targets = sum(int(np.count_nonzero(m[a + 1 : b])) for a, b in spans)
        return targets, sum(b - a - 1 for a, b in spans)

    def counts(self, items: np.ndarray) -> tuple[int, int]:
        """(kept targets, input tokens) of these training items, without building them."""
        if self.pack:
            pairs = [self._row_counts[int(r)] for r in items]
            return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        targets = tokens = 0
        for d in items:
            a, b = self._span(int(d))
            targets += int(np.count_nonzero(self.cache.mask[a + 1 : b]))
            tokens += b - a - 1
        return targets, tokens

    def positions(self, items: np.ndarray) -> int:
        """Positions (tokens plus padding) of one micro-batch of these training items."""
        if self.pack:
            return len(items) * max(self._row_counts[int(r)][1] for r in items)
        return len(items) * max(self._span(int(d))[1] - self._span(int(d))[0] - 1 for d in items)

    def _packed(self, rows: np.ndarray) -> Batch:
        """Packed rows: conversations back to back, each its own document; the row's
        unused tail is padding (lengths), so the batch is as wide as its fullest row."""
        c = self.cache
        used = [self._row_counts[int(r)][1] for r in rows]
        width = max(used)
        idx = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        tgt = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        docs = np.full((len(rows), width), -1, dtype=np.int32)  # padding: a document of its own
        for r, row in enumerate(rows):
            t = 0
            for d, (a, b) in enumerate(self.rows[int(row)]):
                ids = np.asarray(c.tokens[a:b], dtype=np.int64)
                mask = np.asarray(c.mask[a:b], dtype=bool)
                n = b - a - 1
                idx[r, t : t + n] = ids[:-1]
                tgt[r, t : t + n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                docs[r, t : t + n] = d
                t += n
        full = all(u == width for u in used)
        lengths = None if full else torch.tensor(used, dtype=torch.int64)
        n_targets = int((tgt != IGNORE_INDEX).sum())
        return Batch(torch.from_numpy(idx), torch.from_numpy(tgt), lengths, n_targets,
                     torch.from_numpy(docs))  # fmt: skip

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
        return self._packed(items) if self.pack else self._rows(items)

    def val_batch(self, items: np.ndarray) -> Batch:
        return (self._packed if self.pack else self._rows)(self.n_train + items)

    def bits_per_byte(self, loss_nats: float) -> float | None:
        return None  # the loss covers assistant tokens only; bytes per token is undefined


def batch_source(cache: TokenCache, phase: str, seq_len: int, val_fraction: float, seed: int,
                 pad_id: int = 0, doc_mask: bool = False,
                 pack: bool = False) -> PretrainWindows | ChatBatches:  # fmt: skip
    """The batch source for a token cache, checked against the phase that trains on it
    (``doc_mask`` applies to pretraining windows, ``pack`` to conversations)."""
    if cache.kind != phase:
        raise TrainingError(f"phase {phase!r} cannot train on a {cache.kind!r} token cache")
    if cache.kind == "pretrain":
        return PretrainWindows(cache, seq_len, val_fraction, seed, doc_mask)
    return ChatBatches(cache, seq_len, val_fraction, seed, pad_id, pack)


# ----------------------------------------------------------------------------- steps


@dataclass
class StepBatches:
    """This rank's micro-batches of one optimizer step, and the counts of the whole global
    step (all ranks, all micro-steps) that weight each micro-batch's loss."""

    micro: list[Batch]
    global_targets: int
    global_tokens: int
    global_positions: int = 0  # tokens plus padding, over all ranks' micro-batches


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
        # every rank's micro-batch of the step: the padding of the whole global step
        positions = sum(self.source.positions(items[lo : lo + self.b])
                        for lo in range(0, self.per_step, self.b))  # fmt: skip
        micro = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.b  # this rank's slice of micro-step m
            micro.append(self.source.train_batch(epochs[lo : lo + self.b], items[lo : lo + self.b]))
        return StepBatches(micro, targets, tokens, positions)


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
