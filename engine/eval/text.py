"""Held-out text: mean loss, perplexity and bits per byte, with a sliding window.

What is scored, exactly. A document is encoded as ``<|bos|> text`` (the training format
without its closing ``<|eos|>``). Every token of ``text`` is scored given everything
before it, starting with the BOS, so the first token of a document counts too; the BOS
itself is given, never scored, and no EOS is scored (the harness's rolling log-likelihood
does the same). Then

    loss            = sum of token NLL (nats) / tokens scored
    perplexity      = exp(loss)
    bits per byte   = sum of token NLL (nats) / ln 2 / bytes

where bytes is the UTF-8 size of the documents *as read*, before the tokenizer's
normalization: two models with different tokenizers (or normalizations) are charged for
the same bytes, which is what makes bits per byte comparable across vocabularies.

A document longer than the context L is scored in windows of at most L tokens that start
every ``stride`` tokens: the first window scores its tokens 1..L, each later one scores
only the tokens no earlier window scored, so every token is scored exactly once and (after
the first window) with at least L - stride tokens of context. stride = L gives disjoint
windows (fastest, least context); stride 1 gives every token a full window (slowest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import SettingError

Row = tuple[list[int], int]  # (token ids, how many of the last targets to score)


@dataclass
class TextScore:
    """Totals over the scored documents; the derived figures are properties."""

    documents: int
    tokens: int
    bytes: int
    nll: float  # sum of token negative log-likelihoods, nats
    context: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(loss=self.loss, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte)
        return d


@torch.no_grad()
def score_rows(model, rows: Sequence[Row], batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> list[float]:  # fmt: skip
    """For each row (ids, n): the sum of log p(ids[t] | ids[:t]) over its last n tokens,
    in nats (float64). Rows are sorted by length and run as right-padded batches: the
    model is causal, so a pad after a row's end never changes that row's scores, and only
    the scored positions are projected onto the vocabulary."""
    if batch_size < 1:
        raise SettingError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    device = model.device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i][0]) for i in chunk) - 1  # inputs drop each row's last id
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids = rows[i][0]
            idx[r, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        hidden = model.hidden_states(idx.to(device))
        for r, i in enumerate(chunk):
            ids, n = rows[i]
            t = len(ids) - 1  # inputs of this row; position p predicts ids[p + 1]
            if not 1 <= n <= t:
                raise ValueError(f"cannot score {n} tokens of a row of {len(ids)}")
            logits = model.project(hidden[r, t - n : t]).float()
            targets = torch.tensor(ids[t - n + 1 :], dtype=torch.long, device=device)
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])
            out[i] = float(logp.double().sum())
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def document_windows(ids: list[int], context: int, stride: int) -> list[Row]:
    """Split ``<|bos|> text`` ids into scoring windows (see the module docstring).

    >>> document_windows([0, 1, 2, 3, 4, 5], context=4, stride=2)
    [([0, 1, 2, 3, 4], 4), ([2, 3, 4, 5], 1)]
    """
    if not 1 <= stride <= context:
        raise SettingError(
            f"stride must be in 1..{context} (the context), got {stride}", field="stride"
        )
    n = len(ids) - 1  # targets: ids[1..n]
    rows, done, start = [], 0, 0
    while done < n:
        end = min(start + context, n)  # the last target this window reaches
        rows.append((ids[start : end + 1], end - done))
        done, start = end, start + stride
    return rows


def count_windows(n_targets: int, context: int, stride: int) -> int:
    """len(document_windows(...)) for a document of n_targets scored tokens."""
    if n_targets <= 0:
        return 0
    return 1 + max(0, math.ceil((n_targets - context) / stride))


def prefix_token(tokenizer) -> int:
    """The token every scored row starts from: <|bos|>, or for an imported tokenizer
    without one its end-of-text token (what lm-evaluation-harness uses as the prefix)."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise SettingError("the tokenizer has neither a bos nor an eos token to start a row from")
    return start


def evaluate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TextScore:
    """Score documents (see the module docstring). ``context`` defaults to the model's
    max_seq_len and ``stride`` to half the context; ``progress(done, total)`` counts
    windows. Documents whose text encodes to no token are not counted."""
    max_len = model.config.max_seq_len
    context = context or max_len
    if not 1 <= context <= max_len:
        raise SettingError(f"context must be in 1..{max_len} (the model's max_seq_len), "
                           f"got {context}", field="context")  # fmt: skip
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise SettingError(
            f"stride must be in 1..{context} (the context), got {stride}", field="stride"
        )
    start = prefix_token(tokenizer)
    docs = [(start, tokenizer.encode(t), len(t.encode("utf-8"))) for t in texts]
    docs = [d for d in docs if d[1]]
    total = sum(count_windows(len(ids), context, stride) for _, ids, _ in docs)
    nll, done, pending = 0.0, 0, []

    def flush() -> None:
        nonlocal nll, done
        nll -= sum(score_rows(model, pending, batch_size))
        done += len(pending)
        pending.clear()
        if progress is not None:
            progress(done, total)

    model.eval()
    for bos, ids, _ in docs:
        for row in document_windows([bos, *ids], context, stride):
            pending.append(row)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return TextScore(documents=len(docs), tokens=sum(len(ids) for _, ids, _ in docs),
                     bytes=sum(b for *_, b in docs), nll=nll, context=context,
                     stride=stride)  # fmt: skip
