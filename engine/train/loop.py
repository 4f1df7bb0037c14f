"""One training loop for pretraining and instruction tuning (SFT), one process or many.

    StepPlanner + Prefetcher (engine.batches): step s's micro-batches, built ahead
      --> train_step: micro-steps under autocast, each loss weighted by its share of the
          global step's targets, backward (DDP all-reduces on the last micro-step only)
      --> clip the global grad norm --> AdamW at the scheduled lr (engine.train_config)
      --> loss and grad norm stay on the device; every log_every steps, and before any
          eval or save, flush_metrics reads them in one sync, checks them, logs them (run_log)
      --> eval / early stop / periodic save --> a stop request? save here and return

A step never waits for the host: no ``.item()`` per micro-step, the next batch is copied
while this one runs. Step boundaries are the only places where the loop looks at a stop
request (engine.stop), so a checkpoint always holds a state the run was really in.

The distributed context is always there; outside torchrun it is rank 0 of 1 and all its
helpers are no-ops, so one step function serves one process and many.

Nothing here prints: progress goes to ``progress(event: dict)``, results come back as a
:class:`TrainResult`, failures are :class:`TrainingError` (or the data, checkpoint and
distributed errors of the modules that raise them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.save_load import save_checkpoint
from ..data.token_cache import TokenCache
from ..devices import resolve_device
from ..lora.adapter_checkpoint import save_adapter_checkpoint
from ..lora.layers import lora_info
from ..stop import StopRequest
from .batches import Prefetcher, StepBatches, StepPlanner, batch_source
from .distributed import DistContext, LossForward, gather_rng_states, rank_seed
from .guard import Guard
from .run_log import RunLog, plot_losses
from .runtime import autocast_dtype, build_optimizer, is_oom
from .train_config import TrainConfig, TrainingError, lr_at
from .trainer_state import TRAINER_STATE_VERSION, check_trainer_state, rng_state, set_rng_state

Progress = Callable[[dict], None]

__all__ = ["TrainResult", "Trainer", "train"]


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
    pad_fraction: float | None = None  # padding share of the positions this session ran
    notes: list[str] = field(default_factory=list)  # data facts for the run summary
    guard: dict | None = None  # {"skipped": n, "rollbacks": m} with the guard on

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("history")
        return d


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one phase of training. Construct, then ``run()``.

    With a ``tokenizer`` and an ``out_dir`` it saves resumable checkpoints to out_dir
    (every ``save_every`` / ``eval_every`` steps, at the end, on a stop request).
    ``resume`` is a loaded resumable :class:`engine.checkpoint.Checkpoint`; ``extra_state``
    is stored in the trainer state (the CLI keeps its multi-phase plan there); ``dist`` is
    the process's DistContext (default: one process); ``stop`` the StopRequest to obey.
    """

    def __init__(self, model: torch.nn.Module, data, config: TrainConfig,
                 out_dir: str | os.PathLike | None = None, *, tokenizer=None,
                 progress: Progress | None = None, resume=None, extra_state: dict | None = None,
                 data_key: str | None = None, dist: DistContext | None = None,
                 stop: StopRequest | None = None, replace_metrics: bool = False):  # fmt: skip
        self.dist = dist if dist is not None else DistContext()
        self.stop = stop if stop is not None else StopRequest()
        self.config, self.data, self.data_key = config, data, data_key
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tokenizer, self.progress = tokenizer, progress
        self.extra_state = dict(extra_state or {})
        self.is_main, self.world_size = self.dist.is_main, self.dist.world_size
        self.device = self.dist.device or resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config, self.device)
        self.planner = StepPlanner(data, config.batch_size, config.grad_accum, config.seed,
                                   self.dist.rank, self.world_size)  # fmt: skip
        if config.steps is not None:
            self.total_steps = config.steps
        else:
            per_epoch = data.n_train / self.planner.per_step
            self.total_steps = max(1, math.ceil(config.epochs * per_epoch))
        self.step = self.tokens_seen = self.bad_evals = 0
        self.positions = [0, 0]  # (input tokens, positions) run in this session: padding
        self.best_val: float | None = None
        self.last_saved_step: int | None = None
        self.log = RunLog(self.out_dir if self.is_main else None, config.phase, replace_metrics)
        self.pending: list[tuple] = []  # (step, loss, grad norm, lr, tokens_seen, time)
        self.t0 = time.perf_counter()
        self._window = (self.t0, 0)  # (time, tokens_seen) where tokens/s is measured from
        if self.dist.rank:
            torch.manual_seed(rank_seed(config.seed, self.dist.rank))  # own dropout per rank
        self.model = model.to(self.device)
        if hasattr(self.model, "backend"):
            self.model.backend = config.backend
        self.optimizer = build_optimizer(self.model, config)
        # The training forward returns the loss; DDP (with other ranks) syncs its gradients.
        self.forward = self.dist.wrap(LossForward(self.model))
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.guard = Guard(config, self.device) if config.guard else None
        if resume is not None:
            self._load_state(resume)
        elif self.guard is not None:
            self.guard.snapshot(self)  # the starting state is a good one

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able trainer state (the optimizer tensors are saved by the checkpoint)."""
        return {
            "version": TRAINER_STATE_VERSION,
            "phase": self.config.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "examples_seen": self.step * self.planner.per_step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val,
            "bad_evals": self.bad_evals,
            "world_size": self.world_size,
            "data_key": self.data_key,
            "rng": rng_state(),
            "train_config": self.config.to_dict(),
            "extra": self.extra_state,
            **({"guard": self.guard.state_dict()} if self.guard is not None else {}),
        }

    def _load_state(self, resume) -> None:
        where = str(resume.path)
        st = check_trainer_state(resume.trainer_state, where)
        if st["phase"] != self.config.phase:
            raise TrainingError(
                f"{where}: saved in phase {st['phase']!r}, not {self.config.phase!r}"
            )
        if st["world_size"] != self.world_size:
            raise TrainingError(
                f"{where}: saved with {st['world_size']} processes; "
                f"resume with the same number (this run has {self.world_size})"
            )
        if self.data_key and st["data_key"] and st["data_key"] != self.data_key:
            raise TrainingError(
                f"{where}: the training data or tokenizer differ from the run being resumed"
            )
        self.step = int(st["step"])
        if self.step > self.total_steps:
            raise TrainingError(
                f"{where}: at step {self.step}, beyond this run's {self.total_steps} steps"
            )
        self.tokens_seen, self.best_val = st["tokens_seen"], st["best_val_loss"]
        self.bad_evals = st["bad_evals"]
        resume.load_optimizer_state(self.optimizer)
        ranks = st.get("rng_ranks")
        own = ranks[self.dist.rank] if ranks and len(ranks) == self.world_size else st["rng"]
        set_rng_state(own)
        self.last_saved_step = self.step
        if self.guard is not None and isinstance(st.get("guard"), dict):
            self.guard.load_state_dict(st["guard"], where)
            self.guard.load_snapshots(resume.path, self.step, st["guard"])
        self.log.adopt(resume.path)
        self.log.drop_after(self.step)

    # -- one step ------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, sb: StepBatches) -> None:
        """Forward/backward over this rank's micro-batches, clip, AdamW. No host sync:
        the step's loss and grad norm are queued as device tensors for ``flush_metrics``."""
        lr = lr_at(self.step, self.total_steps, self.config)
        if self.guard is not None:
            lr *= self.guard.lr_scale(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        n_global = max(1, sb.global_targets)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, bt in enumerate(sb.micro):
            with self.dist.no_sync(self.forward, sync=i == len(sb.micro) - 1):
                with self._autocast():
                    loss = self.forward(bt.idx, bt.targets, bt.lengths, bt.document_ids)
                # DDP averages gradients over W ranks, so weighting by n_i * W / N makes the
                # update sum_i n_i g_i / N: the token-weighted gradient of the global step.
                weighted = loss * (bt.n_targets * self.world_size / n_global)
                self.dist.run("the gradient all-reduce", weighted.backward)
            loss_sum += loss.detach().double() * (bt.n_targets / n_global)
        loss_sum = self.dist.all_reduce_tensor(loss_sum)  # the global loss, on every rank
        params = self.model.parameters()
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        bad = None
        if self.guard is not None:  # a bad step's update is skipped inside the fused AdamW
            bad = self.optimizer.found_inf = self.guard.check(loss_sum, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += sb.global_tokens
        pad = 1.0 - sb.global_tokens / max(1, sb.global_positions)
        self.positions[0] += sb.global_tokens
        self.positions[1] += sb.global_positions
        self.pending.append((self.step, loss_sum, norm, lr, self.tokens_seen, time.perf_counter(),
                             pad, bad))  # fmt: skip

    def flush_metrics(self) -> list[dict]:
        """Read the queued steps from the device (one sync), stop on a non-finite value
        (without the guard), and return their metrics records (with the guard: and one
        record per skipped step)."""
        if not self.pending:
            return []
        losses = torch.stack([p[1] for p in self.pending])
        norms = torch.stack([p[2].double() for p in self.pending]).to(losses.device)
        flags = [torch.zeros_like(p[1]) if p[7] is None else p[7] for p in self.pending]
        rows = torch.stack([losses, norms, torch.stack(flags).double().to(losses.device)])
        values = rows.cpu().tolist()  # the sync
        skipped = values.pop()
        bad = next(
            (i for i, v in enumerate(zip(*values, strict=True)) if not all(map(math.isfinite, v))),
            None,
        )
        if self.guard is None and self.dist.any_flag(bad is not None):
            raise self._nonfinite(values, bad)
        window_tokens = self.pending[-1][4] - self._window[1]
        tps = window_tokens / max(self.pending[-1][5] - self._window[0], 1e-9)
        records = [
            {"phase": self.config.phase, "step": step, "loss": loss, "lr": lr,
             "grad_norm": gn, "tokens_per_s": tps, "tokens_seen": seen, "elapsed_s": t - self.t0,
             "pad_fraction": pad}
            for (step, _, _, lr, seen, t, pad, _), loss, gn in zip(self.pending, *values,
                                                                strict=True)
        ]  # fmt: skip
        self.pending.clear()
        if self.guard is None:
            return records
        events = self.guard.observe(records, skipped)
        for ev in events:
            self._emit(ev)
        return records + events

    def _nonfinite(self, values, bad: int | None) -> TrainingError:
        self.optimizer.zero_grad(set_to_none=True)
        if bad is None:  # another rank saw it
            what, value, step = "a value", float("nan"), self.pending[0][0]
        else:
            loss, norm = values[0][bad], values[1][bad]
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
            step = self.pending[bad][0]
        where = (
            f"the last good checkpoint is {self.out_dir} (step {self.last_saved_step})"
            if self.last_saved_step is not None
            else "no checkpoint was saved in this phase"
        )
        return TrainingError(
            f"{what} became {value} at step {step} of {self.config.phase}; "
            f"stopped ({where}). Try a lower `lr` or a smaller `grad_clip`"
        )

    def _out_of_memory(self, e: BaseException) -> TrainingError:
        self.optimizer.zero_grad(set_to_none=True)
        b, t = self.config.batch_size, self.data.T
        return TrainingError(
            f"out of memory in step {self.step + 1} ({self.device.type}, batch {b} x {t} "
            f"tokens): lower `batch_size` or `seq_len`, or use `grad_accum` "
            f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
        )

    # -- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean validation loss over the first eval_batches batches of the val split.

        With W ranks the evaluated items are those of one process with batch W * b; rank
        r takes rows [r * b, (r + 1) * b) of each such batch, and the sums are all-reduced,
        so every rank gets the same token-weighted mean.
        """
        if not self.data.n_val:
            return None
        self.model.eval()
        b, gb = self.config.batch_size, self.config.batch_size * self.world_size
        n = min(self.data.n_val, self.config.eval_batches * gb)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for start in range(self.dist.rank * b, n, gb):
            bt = self.data.val_batch(np.arange(start, min(n, start + b))).to(self.device)
            if bt.n_targets:
                with self._autocast():
                    loss = self.model.loss(bt.idx, bt.targets, lengths=bt.lengths,
                                           document_ids=bt.document_ids)  # fmt: skip
                loss_sum += loss.double() * bt.n_targets
                count += bt.n_targets
        sums = torch.stack([loss_sum, torch.tensor(float(count), device=self.device).double()])
        loss_total, count = self.dist.all_reduce_tensor(sums).tolist()
        if not count:
            return None
        val = loss_total / count
        return {
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "val_bpb": self.data.bits_per_byte(val),
            "val_tokens": int(count),
        }

    # -- saving --------------------------------------------------------------------------

    def save(self) -> str | None:
        """Write a resumable checkpoint to out_dir; every rank calls it at the same step.

        With DDP the RNG states of all ranks are gathered (each resumes its own stream),
        rank 0 writes, and all ranks meet at a barrier after the write.
        """
        if self.tokenizer is None or self.out_dir is None:
            return None
        rng_ranks = None
        if self.dist.is_distributed:
            rng_ranks = gather_rng_states(self.dist, rng_state())
        if self.is_main:
            state = self.state_dict()
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            # save_checkpoint carries metrics.jsonl and the plots over into the new directory
            train_config = {**self.config.to_dict(), "extra": self.extra_state}
            if lora_info(self.model) is not None:  # LoRA: the adapters and a base reference
                save_adapter_checkpoint(self.out_dir, self.model, train_config, self.optimizer,
                                        state, self.config.max_shard_size)  # fmt: skip
            else:
                save_checkpoint(self.out_dir, self.model, self.tokenizer, train_config,
                                optimizer=self.optimizer, trainer_state=state,
                                max_shard_size=self.config.max_shard_size)  # fmt: skip
            if self.guard is not None:
                self.guard.save_snapshots(self.out_dir, self.step)
        self.dist.barrier()
        self.last_saved_step = self.step
        self._emit({"event": "save", "step": self.step, "path": str(self.out_dir)})
        return str(self.out_dir)

    # -- the loop ------------------------------------------------------------------------

    def _emit(self, event: dict) -> None:
        if self.progress is not None and self.is_main:
            self.progress({"phase": self.config.phase, **event})

    def _after_step(self) -> str | None:
        """Logging, evaluation, early stopping and periodic saves at this step boundary;
        returns "early_stopped" to end the phase."""
        cfg, s, last = self.config, self.step, self.step == self.total_steps
        evaluating = bool(cfg.eval_every) and (s % cfg.eval_every == 0 or last)
        save_every = cfg.save_every or cfg.eval_every
        saving = bool(save_every) and s % save_every == 0 and not last
        if not (evaluating or saving or last or s % cfg.log_every == 0):
            return None
        records = self.flush_metrics()
        if self.guard is not None and (ev := self.guard.decide(s, self)) is not None:
            self._emit(ev)  # rolled back: this boundary's eval and save come later
            self.log.append([*records, ev])
            self._window = (time.perf_counter(), self.tokens_seen)
            return None
        events = [r for r in records if "event" in r]  # the guard's skips
        records = [r for r in records if "event" not in r]
        status = None
        if evaluating and (ev := self.evaluate()) is not None:
            records[-1].update(ev)
            if self.best_val is None or ev["val_loss"] < self.best_val:
                self.best_val, self.bad_evals = ev["val_loss"], 0
            else:
                self.bad_evals += 1
            stop = bool(cfg.patience) and self.bad_evals >= cfg.patience
            if self.dist.broadcast_flag(stop):  # rank 0 decides; nobody waits alone
                status = "early_stopped"
            self._emit({"event": "eval", **records[-1]})
        self.log.append(records + events)
        self._emit({"event": "step", "total_steps": self.total_steps, **records[-1]})
        if saving and status is None:
            self.save()
        self._window = (time.perf_counter(), self.tokens_seen)  # eval/save time is not training
        return status

    def run(self) -> TrainResult:
        self.t0 = time.perf_counter()
        self._window = (self.t0, self.tokens_seen)
        start_step, status = self.step, "completed"
        self._emit({"event": "start", "step": self.step, "total_steps": self.total_steps,
                    "n_train": self.data.n_train, "n_val": self.data.n_val})  # fmt: skip
        with contextlib.closing(Prefetcher(self.planner, self.device)) as batches:
            while self.step < self.total_steps:
                if self.dist.any_flag(bool(self.stop)):  # the only place a stop is obeyed
                    status = "interrupted"
                    break
                ahead = self.step + 1 if self.step + 1 < self.total_steps else None
                data = self.guard.data_step if self.guard is not None else int
                try:
                    self.train_step(
                        batches.get(data(self.step), None if ahead is None else data(ahead))
                    )
                except (MemoryError, RuntimeError) as e:  # CUDA OOM is a RuntimeError too
                    if not is_oom(e):
                        raise
                    raise self._out_of_memory(e) from None
                if (end := self._after_step()) is not None:
                    status = end
                    break
        self.log.append(self.flush_metrics())  # steps of an interrupted window
        checkpoint = self.save()
        self.forward = None  # drop DDP's gradient hooks before a next phase wraps again
        gc.collect()
        if self.out_dir is not None and self.is_main and self.log.history:
            plot_losses(self.log.phase_records(), self.out_dir / f"loss_{self.config.phase}.png",
                        self.config.phase)  # fmt: skip
        losses = [r for r in self.log.history if r.get("loss") is not None]
        result = TrainResult(
            status=status,
            phase=self.config.phase,
            step=self.step,
            total_steps=self.total_steps,
            loss=losses[-1]["loss"] if losses else None,
            val_loss=next(
                (r["val_loss"] for r in reversed(self.log.history) if "val_loss" in r), None
            ),  # fmt: skip
            best_val_loss=self.best_val,
            checkpoint=checkpoint,
            tokens=self.tokens_seen,
            seconds=time.perf_counter() - self.t0,
            history=self.log.history,
            pad_fraction=1.0 - self.positions[0] / self.positions[1] if self.positions[1] else None,
            notes=list(getattr(self.data, "notes", [])),
            guard=self.guard.counts() if self.guard is not None else None,
        )
        self._emit({"event": "done", "start_step": start_step, **result.to_dict()})
        return result


def train(model: torch.nn.Module, tokenizer, cache: TokenCache, config: TrainConfig,
          out_dir: str | os.PathLike | None = None, **options) -> TrainResult:  # fmt: skip
    """Train ``model`` for one phase on a token cache; see :class:`Trainer` for ``options``
    (progress, resume, extra_state, dist, stop, replace_metrics).

    ``config.seq_len`` None uses ``model.config.max_seq_len``. With ``out_dir`` the run
    writes metrics.jsonl, a loss plot and resumable checkpoints there.
    """
    max_len = model.config.max_seq_len
    seq_len = config.seq_len or max_len
    if seq_len > max_len:
        raise TrainingError(f"seq_len {seq_len} exceeds the model's max_seq_len {max_len}",
                            field="seq_len")  # fmt: skip
    if cache.vocab_size != model.config.vocab_size:
        raise TrainingError(
            f"token cache vocabulary ({cache.vocab_size}) != model vocab_size "
            f"({model.config.vocab_size})"
        )
    torch.manual_seed(config.seed)
    pad_id = getattr(tokenizer, "pad_id", 0) or 0
    data = batch_source(cache, config.phase, seq_len, config.val_fraction, config.seed, pad_id,
                        config.doc_mask, config.pack)  # fmt: skip
    trainer = Trainer(model, data, config, out_dir, tokenizer=tokenizer, data_key=cache.key,
                      **options)  # fmt: skip
    return trainer.run()
