"""Multiple-choice scoring: acc and acc_norm as lm-evaluation-harness defines them.

For each item, every choice is scored by the log-likelihood of its continuation
``" " + choice`` given the context (with ``--fewshot K``: K solved examples first). Then

    acc       1 if argmax_i  loglik_i                 is the gold choice, else 0
    acc_norm  1 if argmax_i  loglik_i / len(choice_i)  is the gold choice, else 0

where len is the choice's length in characters (without the delimiter), and ties go to
the first choice (numpy's argmax). The figures are means over items, each with the
standard error sample_std(ddof=1) / sqrt(n).

Tokens, as the harness's ``hf`` model makes them: trailing spaces of the context move to
the front of the continuation; the continuation's ids are those of ``encode(context +
continuation)`` after the first ``len(encode(context))``; the row is our ``<|bos|>`` then
the context ids then the continuation ids, cut from the left to the model's context + 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import SettingError
from .task_formats import Item, TaskError
from .text import prefix_token, score_rows

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


@dataclass
class ChoiceResult:
    """Means and standard errors over the scored items, and what each item got."""

    format: str
    items: int
    fewshot: int
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    details: list[dict] = field(default_factory=list)  # per item: gold, pred, pred_norm, lls

    def to_dict(self, details: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "details"}
        if details:
            d["details"] = self.details
        return d


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1) over sqrt(n); None below two values.

    >>> round(mean_stderr([1, 0, 1, 0]), 4)
    0.2887
    """
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm): the argmax of the log-likelihoods, raw and per character;
    the first wins a tie."""
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    return _argmax(lls), _argmax(norm)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def fewshot_contexts(items: Sequence[Item], k: int, seed: int) -> list[str]:
    """Each item's full context: its description, then k solved examples from the
    *other* items (drawn with a generator seeded by (seed, item index), so an item's
    examples do not depend on --limit or the batch size), then its own context."""
    if k < 0:
        raise SettingError(f"fewshot must be >= 0, got {k}", field="fewshot")
    if k and k > len(items) - 1:
        raise SettingError(f"fewshot {k}: the task has only {len(items) - 1} other items "
                           "to draw examples from", field="fewshot")  # fmt: skip
    out = []
    for i, item in enumerate(items):
        shots = ""
        if k:
            rng = random.Random(f"{seed}:{i}")
            picks = rng.sample([j for j in range(len(items)) if j != i], k)
            solved = [items[j].context + TARGET_DELIMITER + items[j].choices[items[j].gold]
                      for j in picks]  # fmt: skip
            shots = FEWSHOT_DELIMITER.join(solved) + FEWSHOT_DELIMITER
        out.append(item.description + shots + item.context)
    return out


def request_ids(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """(row ids, continuation length in tokens), tokenized as the harness does (see the
    module docstring); the row keeps at most max_len + 1 ids, the continuation whole."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context)
    cont = tokenizer.encode(context + continuation)[len(ctx) :]
    if not cont:
        raise TaskError(f"the continuation {continuation!r} encodes to no tokens")
    if len(cont) > max_len:
        raise TaskError(f"a continuation of {len(cont)} tokens does not fit the context "
                        f"of {max_len}")  # fmt: skip
    ids = [prefix_token(tokenizer), *ctx, *cont]
    return ids[-(max_len + 1) :], len(cont)


def evaluate_choices(
    model,
    tokenizer,
    items: Sequence[Item],
    fmt: str = "plain",
    fewshot: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    source: str = "task",
) -> ChoiceResult:
    """Score the first ``limit`` items (all by default); few-shot examples come from the
    whole list. ``progress(done, total)`` counts scored choices; ``source`` (the file)
    starts the message of an item that cannot be scored."""
    if limit is not None and limit < 1:
        raise SettingError(f"limit must be >= 1, got {limit}", field="limit")
    contexts = fewshot_contexts(items, fewshot, seed)
    chosen = list(items[:limit] if limit else items)
    rows = []
    for n, item in enumerate(chosen):
        for c, choice in enumerate(item.choices):
            try:
                rows.append(request_ids(tokenizer, contexts[n], TARGET_DELIMITER + choice,
                                        model.config.max_seq_len))  # fmt: skip
            except ValueError as e:
                raise TaskError(f"{source}:{item.line}: choice {c}: {e}") from None
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, len(rows))

    model.eval()
    scores = score_rows(model, rows, batch_size, step)
    details, at = [], 0
    for item in chosen:
        lls = scores[at : at + len(item.choices)]
        at += len(item.choices)
        pred, pred_norm = predictions(lls, item.choices)
        details.append({"line": item.line, "gold": item.gold, "pred": pred,
                        "pred_norm": pred_norm, "loglikelihoods": lls})  # fmt: skip
    acc = [float(d["pred"] == d["gold"]) for d in details]
    norm = [float(d["pred_norm"] == d["gold"]) for d in details]
    return ChoiceResult(format=fmt, items=len(details), fewshot=fewshot,
                        acc=sum(acc) / len(acc), acc_stderr=mean_stderr(acc),
                        acc_norm=sum(norm) / len(norm), acc_norm_stderr=mean_stderr(norm),
                        details=details)  # fmt: skip
