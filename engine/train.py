"""One training loop for pretraining and instruction tuning (SFT).

    token cache (memmap) --PretrainData / ChatData--> batches (seeded, resumable position)
        --> Trainer: micro-steps (autocast, token-weighted grad accumulation)
        --> clip global grad norm --> AdamW (warmup + cosine lr) --> eval / early stop / save

The two phases differ only in their data: ``pretrain`` samples fixed windows of
``seq_len + 1`` tokens from the concatenated documents and trains on every next token;
``sft`` takes whole conversations (truncated to ``seq_len + 1`` tokens, right-padded to the
longest in the batch, with per-row lengths) and trains only on tokens whose assistant mask
is 1 (the others get target -100).

Reproducibility: the i-th training example of the run is fixed by (seed, i) alone — each
epoch is a seeded permutation of the training items — so the data position is one integer.
A resumable checkpoint stores it with the model, the optimizer state, the step (which fixes
the learning rate) and the torch RNG states; on the CPU a run interrupted at step k and
resumed produces exactly the losses of the uninterrupted run.

Where multi-process training plugs in (see ``Trainer``): ``_build`` (model, optimizer),
``_micro_batches`` (which examples this process trains on), ``_train_step`` (micro-steps),
``evaluate`` and ``save``. Each takes ``rank`` / ``world_size`` into account or is a single
place to add it.

Nothing here prints: progress goes to ``progress(event: dict)``, results come back as a
:class:`TrainResult`, and failures are :class:`TrainingError` (or the data / checkpoint
errors of the modules that raise them).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tritonlm.kernels.dispatch import BACKENDS

from .checkpoint import save_checkpoint
from .model import IGNORE_INDEX
from .token_cache import TokenCache

PHASES = ("pretrain", "sft")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
TRAINER_STATE_VERSION = 1

Progress = Callable[[dict], None]


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, bad configuration for this data, ...)."""


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Hyper-parameters of one training phase; validated, JSON-serializable.

    Exactly one of ``steps`` / ``epochs`` is set (epochs -> steps from the size of the
    training split). ``seq_len`` None means the model's max_seq_len. ``min_lr`` None means
    lr / 10. ``grad_clip`` 0 disables clipping, ``eval_every`` 0 disables evaluation,
    ``patience`` 0 disables early stopping, ``save_every`` 0 saves at every evaluation.
    ``dtype`` "auto" is bfloat16 autocast on CUDA and float32 on the CPU.
    """

    phase: str = "pretrain"
    steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int | None = None
    lr: float = 1e-3
    min_lr: float | None = None
    warmup: int | None = 100  # None: min(100, total_steps // 10), fixed once steps are known
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 20
    patience: int = 0
    val_fraction: float = 0.05
    save_every: int = 0
    log_every: int = 1
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def integer(name, minimum):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {v}")

        def number(name, lo=None, hi=None, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and (v >= hi if hi_open else v > hi):
                raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")

        for name, allowed in (
            ("phase", PHASES),
            ("device", DEVICES),
            ("backend", BACKENDS),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if self.steps is not None:
            integer("steps", 1)
        if self.epochs is not None:
            number("epochs", lo=0, lo_open=True)
        for name in ("batch_size", "grad_accum", "eval_batches", "log_every"):
            integer(name, 1)
        for name in ("eval_every", "patience", "save_every", "seed"):
            integer(name, 0)
        if self.warmup is not None:
            integer("warmup", 0)
        if self.seq_len is not None:
            integer("seq_len", 1)
        number("lr", lo=0)
        if self.min_lr is not None:
            number("min_lr", lo=0)
            if self.min_lr > self.lr:
                raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        number("weight_decay", lo=0)
        number("grad_clip", lo=0)
        number("eps", lo=0, lo_open=True)
        number("val_fraction", lo=0, hi=1, hi_open=True)
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.patience and not self.eval_every:
            raise ValueError("patience needs evaluation (eval_every > 0)")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. parsed JSON); unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"training config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})


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


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    """One micro-batch on the CPU: inputs, shifted targets (-100 = ignored), row lengths."""

    idx: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    lengths: torch.Tensor | None  # [B] int64 or None (all rows full)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        if self.lengths is None:
            return self.idx.numel()
        return int(self.lengths.sum())

    def to(self, device) -> Batch:
        nb = torch.device(device).type == "cuda"
        return Batch(
            self.idx.to(device, non_blocking=nb),
            self.targets.to(device, non_blocking=nb),
            None if self.lengths is None else self.lengths.to(device, non_blocking=nb),
        )


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


class PretrainData:
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
        n = cache.n_tokens
        need = seq_len + 1
        n_val = 0
        if val_fraction > 0:
            n_val = max(need, int(round(n * val_fraction)))
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
        if n_val:
            # Snap to the next document start when both sides stay large enough.
            offs = cache.doc_offsets
            j = int(np.searchsorted(offs, split, side="left"))
            if j < len(offs) - 1 and n - int(offs[j]) >= need:
                split = int(offs[j])
        self.split = split
        self.n_val_tokens = n - split
        # windows per epoch: with a per-epoch shift when there is room for one
        self.shift = (split - seq_len) // seq_len >= 1
        self.n_train = (split - seq_len) // seq_len if self.shift else 1
        self.n_val = self.n_val_tokens // need if n_val else 0
        self.val_bytes = self._val_bytes()

    def _val_bytes(self) -> float:
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
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), None)

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


class ChatData:
    """Whole conversations (truncated to seq_len + 1 tokens) with the assistant mask.

    The last ``val_fraction`` of the conversations (at least one, when val_fraction > 0
    and there are two or more) are the validation split.
    """

    kind = "sft"

    def __init__(self, cache: TokenCache, seq_len: int, val_fraction: float, seed: int, pad_id=0):
        if cache.kind != "sft" or cache.mask is None:
            raise TrainingError(f"{cache.path}: expected a chat (sft) token cache")
        self.cache, self.T, self.seed, self.pad_id = cache, seq_len, seed, pad_id
        n = cache.n_docs
        n_val = 0
        if val_fraction > 0 and n >= 2:
            n_val = min(n - 1, max(1, int(round(n * val_fraction))))
        self.n_train = n - n_val
        self.n_val = n_val
        if self.n_train < 1:
            raise TrainingError("no conversations to train on")

    def _rows(self, docs: np.ndarray) -> Batch:
        c, T = self.cache, self.T
        seqs = []
        for d in docs:
            a, b = int(c.doc_offsets[d]), int(c.doc_offsets[d + 1])
            b = min(b, a + T + 1)
            seqs.append(
                (np.asarray(c.tokens[a:b], dtype=np.int64), np.asarray(c.mask[a:b], dtype=bool))
            )
        width = max(len(ids) - 1 for ids, _ in seqs)
        idx = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        tgt = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        for r, (ids, mask) in enumerate(seqs):
            L = len(ids) - 1
            idx[r, :L] = ids[:-1]
            tgt[r, :L] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            lengths[r] = L
        lt = torch.from_numpy(lengths)
        return Batch(
            torch.from_numpy(idx),
            torch.from_numpy(tgt),
            None if bool((lt == width).all()) else lt,
        )

    def train_batch(self, epochs: np.ndarray, items: np.ndarray) -> Batch:
        return self._rows(items)

    def val_batch(self, items: np.ndarray) -> Batch:
        return self._rows(self.n_train + items)

    def bits_per_byte(self, loss_nats: float) -> float | None:
        return None  # the loss covers assistant tokens only; bytes per token is undefined


def make_data(cache: TokenCache, config: TrainConfig, seq_len: int, pad_id: int = 0):
    """PretrainData or ChatData for the cache's kind, checked against config.phase."""
    if cache.kind != config.phase:
        raise TrainingError(f"phase {config.phase!r} cannot train on a {cache.kind!r} token cache")
    if cache.kind == "pretrain":
        return PretrainData(cache, seq_len, config.val_fraction, config.seed)
    return ChatData(cache, seq_len, config.val_fraction, config.seed, pad_id)


# ----------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What a phase did. status: "completed", "early_stopped" or "interrupted"."""

    status: str
    phase: str
    step: int
    total_steps: int
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: str | None
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("history")
        return d


# ----------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (>= 2-D) only; fused on CUDA."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = dict(lr=config.lr, betas=config.betas, eps=config.eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _encode_rng(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_rng(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    state = {"torch": _encode_rng(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode_rng(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_decode_rng(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_rng(s) for s in state["cuda"]])


def plot_losses(history: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """Write a PNG of train (and validation) loss against step; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    steps = [h["step"] for h in history if h.get("loss") is not None]
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    vsteps = [h["step"] for h in history if h.get("val_loss") is not None]
    vlosses = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    if not steps and not vsteps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train", linewidth=1)
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one phase of training. Construct, then ``run()``.

    With a ``tokenizer`` and an ``out_dir`` it saves resumable checkpoints to out_dir
    (every ``save_every`` / ``eval_every`` steps, at the end, on Ctrl-C).
    ``resume`` is a loaded resumable :class:`engine.checkpoint.Checkpoint`.
    ``extra_state`` is stored in the trainer state (the CLI keeps its multi-phase plan
    there). ``rank`` / ``world_size`` select this process's share of each global batch.
    """

    replace_metrics = False  # set by train(): the first log starts a new metrics.jsonl

    def __init__(
        self,
        model: torch.nn.Module,
        data,
        config: TrainConfig,
        out_dir: str | os.PathLike | None = None,
        tokenizer=None,
        progress: Progress | None = None,
        resume=None,
        extra_state: dict | None = None,
        data_key: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        dist=None,
    ):
        # dist: an engine.distributed.DistContext; with a process group it sets rank,
        # world_size and the device, and the model is wrapped in DDP (see _build).
        self.dist = dist if dist is not None and dist.is_distributed else None
        if self.dist is not None:
            rank, world_size = self.dist.rank, self.dist.world_size
        self.config = config
        self.data = data
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tokenizer = tokenizer
        self.progress = progress
        self.extra_state = dict(extra_state or {})
        self.data_key = data_key
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.device = resolve_device(config.device) if self.dist is None else self.dist.device
        self.amp_dtype = autocast_dtype(config, self.device)
        self.examples_per_step = config.batch_size * config.grad_accum * world_size
        if config.steps is not None:
            self.total_steps = config.steps
        else:
            per_epoch = data.n_train / self.examples_per_step
            self.total_steps = max(1, math.ceil(config.epochs * per_epoch))
        self.sampler = EpochSampler(data.n_train, config.seed)
        self.step = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.tokens_seen = 0
        self.last_saved_step: int | None = None
        self.history: list[dict] = []
        self.ddp: torch.nn.Module | None = None
        if self.dist is not None and self.rank:
            from .distributed import rank_seed

            torch.manual_seed(rank_seed(config.seed, self.rank))  # own dropout masks per rank
        self._build(model)
        if resume is not None:
            self._load_state(resume)

    # -- setup ---------------------------------------------------------------------------

    def _build(self, model: torch.nn.Module) -> None:
        """Move the model to the device, set its backend, build the optimizer."""
        self.model = model.to(self.device)
        if hasattr(self.model, "backend"):
            self.model.backend = self.config.backend
        self.optimizer = build_optimizer(self.model, self.config, self.device)
        if self.dist is not None:
            from .distributed import wrap_ddp

            # self.model stays the bare Transformer (checkpoints, evaluation); self.ddp
            # runs the training forward/backward with gradient all-reduce.
            self.ddp = self.dist.run("wrapping the model in DDP", wrap_ddp, self.model, self.dist)

    def state_dict(self) -> dict:
        """JSON-able trainer state (the optimizer tensors are saved by the checkpoint)."""
        return {
            "version": TRAINER_STATE_VERSION,
            "phase": self.config.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "examples_seen": self.step * self.examples_per_step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val,
            "bad_evals": self.bad_evals,
            "world_size": self.world_size,
            "data_key": self.data_key,
            "rng": rng_state(),
            "train_config": self.config.to_dict(),
            "extra": self.extra_state,
        }

    def _load_state(self, resume) -> None:
        st = resume.trainer_state
        if not st:
            raise TrainingError(f"{resume.path}: not a resumable checkpoint")
        if st.get("version") != TRAINER_STATE_VERSION:
            raise TrainingError(
                f"{resume.path}: unsupported trainer state version {st.get('version')!r}"
            )
        if st.get("phase") != self.config.phase:
            raise TrainingError(
                f"{resume.path}: saved in phase {st.get('phase')!r}, not {self.config.phase!r}"
            )
        if st.get("world_size", 1) != self.world_size:
            raise TrainingError(
                f"{resume.path}: saved with {st.get('world_size')} processes; "
                f"resume with the same number (this run has {self.world_size})"
            )
        if self.data_key and st.get("data_key") and st["data_key"] != self.data_key:
            raise TrainingError(
                f"{resume.path}: the training data or tokenizer differ from the run being resumed"
            )
        self.step = int(st["step"])
        if self.step > self.total_steps:
            raise TrainingError(
                f"{resume.path}: at step {self.step}, beyond this run's {self.total_steps} steps"
            )
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.best_val = st.get("best_val_loss")
        self.bad_evals = int(st.get("bad_evals", 0))
        resume.load_optimizer_state(self.optimizer)
        ranks = st.get("rng_ranks")
        set_rng_state(ranks[self.rank] if ranks and len(ranks) == self.world_size else st["rng"])
        self.last_saved_step = self.step
        self._drop_metrics_after(self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """Forget logged steps of this phase past `step` (a crash after the last save)."""
        path = None if self.out_dir is None else self.out_dir / "metrics.jsonl"
        if path is None or not self.is_main or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        keep = []
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not (r.get("phase") == self.config.phase and r.get("step", 0) > step):
                keep.append(line)
        if len(keep) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
            os.replace(tmp, path)

    def _logged_history(self) -> list[dict]:
        """This phase's records from metrics.jsonl: after a resume the plot then shows the
        whole run, not only the steps of this session."""
        records = []
        try:
            lines = (self.out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return self.history
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("phase") == self.config.phase:
                records.append(r)
        return records or self.history

    # -- data ----------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[Batch]:
        """The grad_accum micro-batches this process trains on at optimizer step `step`.

        Global example positions of the step are laid out micro-step major, rank minor, so
        world_size ranks with batch b see exactly the examples of one process with batch
        world_size * b.
        """
        b, w = self.config.batch_size, self.world_size
        base = step * self.examples_per_step
        out = []
        for m in range(self.config.grad_accum):
            start = base + (m * w + self.rank) * b
            epochs, items = self.sampler.items(start, b)
            out.append(self.data.train_batch(epochs, items))
        return out

    # -- one step ------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _set_lr(self) -> float:
        """Put this step's scheduled learning rate into every parameter group."""
        lr = lr_at(self.step, self.total_steps, self.config)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _clip_gradients(self) -> float:
        """Clip to the global norm (when grad_clip > 0); return the norm before clipping."""
        params = self.model.parameters()
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    def _apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _train_step(self) -> dict:
        """Forward/backward over the micro-batches, clip, AdamW step. Returns step metrics."""
        if self.ddp is not None:
            return self._train_step_ddp()
        batches = self._micro_batches(self.step)
        total_targets = sum(bt.n_targets for bt in batches)
        lr = self._set_lr()
        self.model.train()
        loss_sum = 0.0
        n_tokens = 0
        for bt in batches:
            bt = bt.to(self.device)
            with self._autocast():
                loss = self.model.loss(bt.idx, bt.targets, lengths=bt.lengths)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self._nonfinite("loss", value)
            # token-weighted mean over the whole step: sum_i loss_i * n_i / N
            weight = bt.n_targets / max(1, total_targets)
            (loss * weight).backward()
            loss_sum += value * weight
            n_tokens += bt.n_tokens
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise self._nonfinite("gradient norm", grad_norm)
        self._apply_update()
        self.tokens_seen += n_tokens * self.world_size
        return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens}

    def _train_step_ddp(self) -> dict:
        """_train_step for DDP: the same global step as one process with world_size x batch.

        Every micro-batch loss is weighted by n_i * W / N, where n_i counts its kept targets
        and N those of the whole global step (all ranks, all micro-steps; one all-reduce).
        DDP averages gradients over the W ranks, so the update is sum_i n_i g_i / N: the
        single-process token-weighted gradient, for pretraining and SFT alike (up to float
        summation order). Non-final micro-steps skip the all-reduce (no_sync). A non-finite
        loss or gradient norm is decided on rank 0 and broadcast, so all ranks stop together.
        """
        dist = self.dist
        batches = self._micro_batches(self.step)
        local_targets = sum(bt.n_targets for bt in batches)
        local_tokens = sum(bt.n_tokens for bt in batches)
        total_targets, total_tokens = dist.all_reduce_sum([local_targets, local_tokens])
        lr = self._set_lr()
        self.ddp.train()
        loss_sum = 0.0
        for i, bt in enumerate(batches):
            bt = bt.to(self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss = self.ddp(bt.idx, bt.targets, bt.lengths)
                weight = bt.n_targets * self.world_size / max(1.0, total_targets)
                try:
                    (loss * weight).backward()
                except RuntimeError as e:  # the gradient all-reduce runs inside backward
                    raise dist.failure("the gradient all-reduce", e) from e
            loss_sum += float(loss.detach()) * bt.n_targets / max(1.0, total_targets)
        loss_sum = dist.all_reduce_sum([loss_sum])[0]
        grad_norm = self._clip_gradients()
        bad = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
        if dist.broadcast_flag(bad):
            what, value = (
                ("loss", loss_sum) if not math.isfinite(loss_sum) else ("gradient norm", grad_norm)
            )
            raise self._nonfinite(what, value)
        self._apply_update()
        self.tokens_seen += int(total_tokens)
        return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": local_tokens}

    def _nonfinite(self, what: str, value: float) -> TrainingError:
        self.optimizer.zero_grad(set_to_none=True)
        where = (
            f"the last good checkpoint is {self.out_dir} (step {self.last_saved_step})"
            if self.last_saved_step is not None
            else "no checkpoint was saved in this phase"
        )
        return TrainingError(
            f"{what} became {value} at step {self.step + 1} of {self.config.phase}; "
            f"stopped ({where}). Try a lower --lr or a smaller --grad-clip"
        )

    # -- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean validation loss over the first eval_batches batches of the val split."""
        if not self.data.n_val:
            return None
        was_training = self.model.training
        self.model.eval()
        b = self.config.batch_size
        # With W ranks the evaluated items are those of one process with batch W * b;
        # rank r takes rows [r * b, (r + 1) * b) of each such batch, and the sums are
        # all-reduced, so every rank gets the same token-weighted mean.
        gb = b * self.world_size
        n = min(self.data.n_val, self.config.eval_batches * gb)
        loss_sum, count = 0.0, 0
        for start in range(self.rank * b, n, gb):
            bt = self.data.val_batch(np.arange(start, min(n, start + b))).to(self.device)
            k = bt.n_targets
            if not k:
                continue
            with self._autocast():
                loss = self.model.loss(bt.idx, bt.targets, lengths=bt.lengths)
            loss_sum += float(loss) * k
            count += k
        self.model.train(was_training)
        if self.dist is not None:
            loss_sum, count = self.dist.all_reduce_sum([loss_sum, count])
            count = int(count)
        if not count:
            return None
        val = loss_sum / count
        return {
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "val_bpb": self.data.bits_per_byte(val),
            "val_tokens": count,
        }

    # -- saving --------------------------------------------------------------------------

    def save(self, collective: bool = True) -> str | None:
        """Write a resumable checkpoint to out_dir (main process only).

        With DDP every rank calls this at the same step: the RNG states of all ranks are
        gathered (so each rank resumes its own stream), rank 0 writes, and all ranks meet
        at a barrier after the write; every rank returns the path. ``collective=False``
        (Ctrl-C, when the other ranks may be anywhere) lets rank 0 write alone.
        """
        if self.tokenizer is None or self.out_dir is None:
            return None
        ddp = self.dist is not None
        if not self.is_main and not (ddp and collective):
            return str(self.out_dir) if ddp else None
        rng_ranks = None
        if ddp and collective:
            from .distributed import gather_rng_states

            rng_ranks = gather_rng_states(self.dist, rng_state())
        if self.is_main:
            state = self.state_dict()
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            train_config = {**self.config.to_dict(), "extra": self.extra_state}
            # save_checkpoint carries metrics.jsonl and the plots over into the new directory
            save_checkpoint(
                self.out_dir,
                self.model,
                self.tokenizer,
                train_config,
                optimizer=self.optimizer,
                trainer_state=state,
            )
        if ddp and collective:
            self.dist.barrier()
        self.last_saved_step = self.step
        self._emit({"event": "save", "step": self.step, "path": str(self.out_dir)})
        return str(self.out_dir)

    # -- logging -------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
        if self.progress is not None and self.is_main:
            self.progress({"phase": self.config.phase, **event})

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            mode = "w" if self.replace_metrics else "a"
            self.replace_metrics = False
            with open(self.out_dir / "metrics.jsonl", mode, encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config
        t0 = time.perf_counter()
        start_step = self.step
        status = "completed"
        last_loss = last_val = None
        window_tokens, window_t = 0, time.perf_counter()
        self._emit(
            {"event": "start", "step": self.step, "total_steps": self.total_steps,
             "n_train": self.data.n_train, "n_val": self.data.n_val}
        )  # fmt: skip
        try:
            while self.step < self.total_steps:
                m = self._train_step()
                if self.dist is not None:
                    from .distributed import maybe_inject_fault

                    maybe_inject_fault(self.step, self.rank)
                last_loss = m["loss"]
                window_tokens += m["tokens"] * self.world_size
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                record = {
                    "phase": cfg.phase,
                    "step": self.step,
                    "loss": m["loss"],
                    "lr": m["lr"],
                    "grad_norm": m["grad_norm"],
                    "tokens_per_s": tps,
                    "tokens_seen": self.tokens_seen,
                    "elapsed_s": now - t0,
                }
                window_tokens, window_t = 0, now
                evaluated = cfg.eval_every and (
                    self.step % cfg.eval_every == 0 or self.step == self.total_steps
                )
                stop = False
                if evaluated:
                    ev = self.evaluate()
                    if ev is not None:
                        record.update(ev)
                        last_val = ev["val_loss"]
                        if self.best_val is None or last_val < self.best_val:
                            self.best_val, self.bad_evals = last_val, 0
                        else:
                            self.bad_evals += 1
                            stop = bool(cfg.patience) and self.bad_evals >= cfg.patience
                    if self.dist is not None:  # rank 0 decides; nobody waits alone
                        stop = self.dist.broadcast_flag(stop)
                    self._emit({"event": "eval", **record})
                if self.step % cfg.log_every == 0 or evaluated or stop:
                    self._log(record)
                self._emit({"event": "step", "total_steps": self.total_steps, **record})
                save_every = cfg.save_every or cfg.eval_every
                if stop:
                    status = "early_stopped"
                    break
                if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
                window_t = time.perf_counter()  # do not count eval/save time as training
        except KeyboardInterrupt:
            status = "interrupted"
        checkpoint = self.save(collective=status != "interrupted")
        if self.ddp is not None:  # drop DDP's gradient hooks before a next phase wraps again
            self.ddp = None
            gc.collect()
        if self.out_dir is not None and self.is_main and self.history:
            plot_losses(self._logged_history(), self.out_dir / f"loss_{cfg.phase}.png", cfg.phase)
        result = TrainResult(
            status=status,
            phase=cfg.phase,
            step=self.step,
            total_steps=self.total_steps,
            loss=last_loss,
            val_loss=last_val,
            best_val_loss=self.best_val,
            checkpoint=checkpoint,
            tokens=self.tokens_seen,
            seconds=time.perf_counter() - t0,
            history=self.history,
        )
        self._emit({"event": "done", "start_step": start_step, **result.to_dict()})
        return result


def train(
    model: torch.nn.Module,
    tokenizer,
    cache: TokenCache,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: Progress | None = None,
    resume=None,
    extra_state: dict | None = None,
    dist=None,
    replace_metrics: bool = False,
) -> TrainResult:
    """Train `model` for one phase on a token cache; see :class:`Trainer`.

    ``replace_metrics``: a fresh run over an old run directory; its first logged step
    replaces the old metrics.jsonl (not earlier, so a run that fails to start loses nothing).

    ``config.seq_len`` None uses ``model.config.max_seq_len``. With ``out_dir`` the run
    writes metrics.jsonl, a loss plot and resumable checkpoints there. ``resume`` is a
    loaded resumable Checkpoint (its ``model`` should be the ``model`` passed here). A
    KeyboardInterrupt saves a resumable checkpoint and returns status "interrupted".
    ``dist`` is an engine.distributed.DistContext (under torchrun): DDP, this rank's share
    of every global batch, rank 0 writes.
    """
    max_len = model.config.max_seq_len
    seq_len = config.seq_len or max_len
    if seq_len > max_len:
        raise TrainingError(f"seq_len {seq_len} exceeds the model's max_seq_len {max_len}")
    if cache.vocab_size != model.config.vocab_size:
        raise TrainingError(
            f"token cache vocabulary ({cache.vocab_size}) != model vocab_size "
            f"({model.config.vocab_size})"
        )
    torch.manual_seed(config.seed)
    data = make_data(cache, config, seq_len, getattr(tokenizer, "pad_id", 0) or 0)
    trainer = Trainer(
        model,
        data,
        config,
        out_dir,
        tokenizer=tokenizer,
        progress=progress,
        resume=resume,
        extra_state=extra_state,
        data_key=cache.key,
        dist=dist,
    )
    trainer.replace_metrics = replace_metrics
    return trainer.run()
