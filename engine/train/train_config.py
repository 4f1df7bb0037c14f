"""Training hyper-parameters of one phase, and the learning-rate schedule they imply.

Every field is declared once (``engine.fields.option``): its check, its meaning, and
whether ``llm-train`` exposes it as a flag (``--batch-size`` for ``batch_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tritonlm.kernels.dispatch import BACKENDS

from ..checkpoint.shards import DEFAULT_MAX_SHARD_SIZE
from ..errors import EngineError
from ..fields import MAX_SEED, ConfigMixin, at_least, boolean, number, one_of, option
from ..sizes import parse_size

PHASES = ("pretrain", "sft")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


class TrainingError(EngineError, RuntimeError):
    """The run cannot continue (non-finite loss, bad configuration for this data, ...)."""


def _size(name: str, v) -> None:
    try:
        if not isinstance(v, str):
            raise ValueError
        parse_size(v)
    except ValueError:
        raise ValueError(f"{name} must be a size such as 5GB, 500MB or 2GiB, got {v!r}") from None


def _betas(name: str, v) -> None:
    if not (
        isinstance(v, tuple)
        and len(v) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
    ):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {v!r}")


@dataclass
class TrainConfig(ConfigMixin):
    """Hyper-parameters of one training phase; validated, JSON-serializable.

    Exactly one of ``steps`` / ``epochs`` is set (epochs -> steps from the size of the
    training split). ``seq_len`` None means the model's max_seq_len.
    """

    what = "training config"  # error messages: "unknown training config key(s): ..."

    phase: str = option("pretrain", one_of(PHASES), flag=False)
    steps: int | None = option(1000, at_least(1, optional=True), flag=False)
    epochs: float | None = option(None, number(lo=0, lo_open=True, optional=True), flag=False)
    batch_size: int = option(16, at_least(1), "sequences per micro-batch", metavar="N")
    grad_accum: int = option(1, at_least(1), "micro-batches per optimizer step", metavar="N")
    seq_len: int | None = option(
        None,
        at_least(1, optional=True),
        "context length (new model: its max_seq_len; else <= the model's)",
        metavar="N",
    )
    lr: float = option(1e-3, number(lo=0), "peak learning rate")
    min_lr: float | None = option(
        None,
        number(lo=0, optional=True),
        "final cosine learning rate (default: lr/10)",
        metavar="LR",
    )
    warmup: int | None = option(
        None,
        at_least(0, optional=True),
        "linear warmup steps (default: min(100, total steps / 10))",
        metavar="N",
    )
    weight_decay: float = option(0.1, number(lo=0), "AdamW weight decay on matrices", metavar="W")
    grad_clip: float = option(
        1.0, number(lo=0), "clip the global gradient norm; 0 = off", metavar="NORM"
    )
    betas: tuple[float, float] = option((0.9, 0.95), _betas, flag=False)
    eps: float = option(1e-8, number(lo=0, lo_open=True), flag=False)
    seed: int = option(1337, at_least(0, maximum=MAX_SEED), "random seed", metavar="N")
    eval_every: int = option(
        100, at_least(0), "evaluate (and save) every N steps; 0 = never", metavar="N"
    )
    eval_batches: int = option(20, at_least(1), "validation batches per evaluation", metavar="N")
    patience: int = option(
        0, at_least(0), "stop after N evaluations without improvement; 0 = off", metavar="N"
    )
    val_fraction: float = option(
        0.05, number(lo=0, hi=1, hi_open=True), "held-out share of the data", metavar="F"
    )
    save_every: int = option(
        0, at_least(0), "save a checkpoint every N steps; 0 = with each evaluation", metavar="N"
    )
    log_every: int = option(
        10,
        at_least(1),
        "read the loss from the device every N steps (metrics.jsonl still gets every step; "
        "the progress bar updates at this rate)",
        metavar="N",
    )
    device: str = option("auto", one_of(DEVICES), "default: cuda when available", choices=DEVICES)
    backend: str = option(
        "auto",
        one_of(BACKENDS),
        "kernels: auto = Triton on CUDA, torch reference otherwise",
        choices=BACKENDS,
    )
    dtype: str = option(
        "auto",
        one_of(DTYPES),
        "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)",
        choices=DTYPES,
    )
    compile: bool = option(False, boolean, "torch.compile the model (first steps are slower)")
    # Packed sequences. False is what a saved config without the key means (runs from
    # before the option resume unchanged); llm-train turns doc_mask on for new runs.
    doc_mask: bool = option(False, boolean, flag=False)  # pretraining: attend within documents
    pack: bool = option(False, boolean, flag=False)  # SFT: pack conversations into full rows
    guard: bool = option(
        True,
        boolean,
        "turn off the guard (skip spiking or non-finite steps, roll back after too many)",
    )
    guard_spike: float = option(
        3.0,
        number(lo=1, lo_open=True),
        "a step loss above K x the recent median is a spike",
        metavar="K",
    )
    guard_skips: int = option(
        3, at_least(1), "roll back after N skipped steps within `guard_window`", metavar="N"
    )
    guard_window: int = option(50, at_least(1), "steps the guard counts skips over", metavar="N")
    guard_rewarmup: int = option(
        20, at_least(0), "steps of learning-rate re-warmup after a rollback", metavar="N"
    )
    max_shard_size: str = option(
        DEFAULT_MAX_SHARD_SIZE,
        _size,
        "split the checkpoint's weight and optimizer files into shards of at most this size "
        "(5GB, 500MB, 2GiB; 1GB = 10^9 bytes)",
        metavar="SIZE",
    )

    def check_together(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of `steps` and `epochs`")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"`min_lr` ({self.min_lr}) must not exceed `lr` ({self.lr})")
        if self.patience and not self.eval_every:
            raise ValueError("`patience` needs evaluation (`eval_every` > 0)")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine.

    >>> c = TrainConfig(lr=1.0, min_lr=0.0, warmup=2, steps=10)
    >>> [round(lr_at(s, 10, c), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.345, 0.0]

    ``warmup=None`` means min(100, total_steps // 10): with --epochs the step count is only
    known once the data is, so the default is resolved here rather than by the caller.
    """
    warmup = min(100, total_steps // 10) if cfg.warmup is None else cfg.warmup
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    t = min(1.0, (step - warmup) / decay_steps)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + math.cos(math.pi * t))
