"""The training guard: a run that survives its own loss spikes and non-finite values.

Per step, on the device (no host sync): the step is *bad* when its loss or gradient norm
is not finite, or its loss is above ``guard_spike`` x the median of the recent good losses.
A bad step's update is skipped: the fused AdamW gets the flag as ``found_inf`` (as the AMP
grad scaler passes it) and leaves weights, moments and step count untouched.

At each logging boundary (host values are read there anyway): a boundary whose steps were
all good stores a snapshot of the model and optimizer (the last two are kept: the newest
may already hold damage whose loss shows only later). When ``guard_skips`` steps of the
last ``guard_window`` were skipped, the run rolls back to the older snapshot, skips the
batches it trained on since (the data position moves on, so a resume replays exactly the
same batches) and re-warms the learning rate over ``guard_rewarmup`` steps.

Decisions use values that are identical on every rank (the all-reduced loss and gradient
norm), so under torchrun all ranks skip and roll back together. The guard's bookkeeping
goes into the trainer state and its snapshots into ``guard.safetensors`` next to the
checkpoint, so a run interrupted anywhere, even mid-recovery, resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .train_config import TrainConfig, TrainingError
from .trainer_state import rng_ok

GUARD_FILE = "guard.safetensors"
MEDIAN_OF = 20  # recent good losses the spike test compares against
MAX_SAME_ROLLBACKS = 3  # rolling back to one snapshot again and again: give up


@dataclass
class Snapshot:
    """A copy of the training state at ``step`` (on the training device)."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: torch.Tensor
    rng: dict


@dataclass
class GuardState:
    """The guard's host bookkeeping (JSON in the trainer state)."""

    skipped: int = 0  # updates skipped in this phase
    rollbacks: int = 0
    skip_steps: list[int] = field(default_factory=list)  # recent skipped steps
    dirty: bool = False  # a step since the last boundary was skipped
    data_offset: int = 0  # batches skipped by rollbacks: data step = step + data_offset
    rewarm_from: int | None = None
    same_target: list[int] = field(default_factory=lambda: [-1, 0])  # [step, times]
    position: int = 0  # next slot of the loss history


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**53


def _count(v) -> bool:
    return _int(v) and v >= 0


def _counts(v) -> bool:
    return isinstance(v, list) and all(map(_int, v))


def _snapshot_list(d: dict, key: str, n: int, ok) -> bool:
    v = d.get(key, [] if n == 0 else None)
    return isinstance(v, list) and len(v) == n and all(map(ok, v))


def _param_groups(v) -> bool:
    return isinstance(v, list) and all(isinstance(g, dict) for g in v)


# What each GuardState field may hold when read back from a (possibly edited) trainer state.
_STATE_TYPES = {
    "skipped": _count,
    "rollbacks": _count,
    "data_offset": _count,
    "position": _count,
    "skip_steps": _counts,
    "dirty": lambda v: isinstance(v, bool),
    "rewarm_from": lambda v: v is None or _count(v),
    "same_target": lambda v: _counts(v) and len(v) == 2,
}


def _opt_copy(optimizer: torch.optim.Optimizer) -> dict:
    return _opt_clone(optimizer.state_dict())


def _opt_clone(sd: dict) -> dict:
    """A deep copy of an optimizer state dict (tensors cloned, groups via JSON)."""
    state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
             for k, s in sd["state"].items()}  # fmt: skip
    return {"state": state, "param_groups": json.loads(json.dumps(sd["param_groups"]))}


class Guard:
    """Skip decisions on the device, rollbacks at boundaries. See the module docstring."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.cfg, self.device = config, device
        self.history = torch.full((MEDIAN_OF,), float("nan"), dtype=torch.float64, device=device)
        self.st = GuardState()
        self.snapshots: list[Snapshot] = []

    # -- per step (device only) -----------------------------------------------------------

    def check(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The step's bad flag (float 0/1 on the device, for AdamW's ``found_inf``); a good
        loss joins the recent history. No host sync."""
        loss = loss.detach().double()
        norm = norm.detach().double().to(loss.device)
        median = torch.nanmedian(self.history)  # nan (never a spike) until a loss is in
        spike = loss > self.cfg.guard_spike * median
        bad = spike | ~torch.isfinite(loss) | ~torch.isfinite(norm)
        pos = self.st.position
        self.history[pos] = torch.where(bad, self.history[pos], loss)
        self.st.position = (pos + 1) % MEDIAN_OF
        return bad.float()

    def lr_scale(self, step: int) -> float:
        """The re-warmup factor after a rollback (1 otherwise)."""
        start, n = self.st.rewarm_from, self.cfg.guard_rewarmup
        if start is None or not n or step >= start + n:
            return 1.0
        return (step - start + 1) / (n + 1)

    def data_step(self, step: int) -> int:
        return step + self.st.data_offset

    # -- at boundaries (host) -------------------------------------------------------------

    def observe(self, records: list[dict], skipped: list[float]) -> list[dict]:
        """Mark and count the skipped steps of freshly read records (``skipped``: their
        flags); return one event per skip."""
        events = []
        for r, flag in zip(records, skipped, strict=True):
            if not flag:
                continue
            r["skipped"] = True
            for k in ("loss", "grad_norm"):  # metrics.jsonl stays valid JSON
                r[k] = r[k] if math.isfinite(r[k]) else None
            self.st.skipped += 1
            self.st.skip_steps.append(r["step"])
            self.st.dirty = True
            finite = r["loss"] is not None and r["grad_norm"] is not None
            events.append({"phase": r["phase"], "step": r["step"], "event": "guard_skip",
                           "reason": "spike" if finite else "non-finite",
                           "step_loss": r["loss"], "grad_norm": r["grad_norm"]})  # fmt: skip
        return events

    def decide(self, step: int, trainer) -> dict | None:
        """At a logging boundary: snapshot a clean state, or roll back when too many steps
        of the window were skipped. Returns the rollback event, if any."""
        window = self.cfg.guard_window
        self.st.skip_steps = [s for s in self.st.skip_steps if s > step - window]
        if len(self.st.skip_steps) >= self.cfg.guard_skips:
            return self._rollback(step, trainer)
        if not self.st.dirty:
            self.snapshot(trainer)
        self.st.dirty = False
        return None

    def snapshot(self, trainer) -> None:
        from .trainer_state import rng_state

        self.snapshots = self.snapshots[-1:]  # never three copies at once
        model = {
            k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad
        }  # a frozen base (LoRA) never changes
        snap = Snapshot(trainer.step, model, _opt_copy(trainer.optimizer),
                        self.history.clone(), rng_state())  # fmt: skip
        self.snapshots.append(snap)

    def _rollback(self, step: int, trainer) -> dict:
        from .trainer_state import set_rng_state

        if not self.snapshots:
            raise TrainingError(
                f"{len(self.st.skip_steps)} bad steps by step {step} and no good state to "
                "roll back to; try a lower `lr`"
            )
        target = self.snapshots[0]
        times = self.st.same_target[1] + 1 if self.st.same_target[0] == target.step else 1
        if times > MAX_SAME_ROLLBACKS:
            raise TrainingError(
                f"rolled back to step {target.step} {MAX_SAME_ROLLBACKS} times and the loss "
                f"still spikes (step {step}); try a lower `lr` or a larger `guard_spike`"
            )
        self.st.same_target = [target.step, times]
        with torch.no_grad():
            for k, p in trainer.model.named_parameters():
                if k in target.model:
                    p.copy_(target.model[k])
        trainer.optimizer.load_state_dict(_opt_clone(target.optimizer))  # no aliasing
        self.history.copy_(target.history)
        set_rng_state(target.rng)
        self.snapshots = [target]
        skipped = list(range(self.data_step(target.step), self.data_step(step)))
        self.st.data_offset += step - target.step
        self.st.rewarm_from = target.step
        self.st.rollbacks += 1
        self.st.skip_steps, self.st.dirty = [], False
        trainer.step = target.step
        return {"phase": trainer.config.phase, "step": step, "event": "guard_rollback",
                "to_step": target.step, "skipped_batches": [skipped[0], skipped[-1] + 1],
                "rewarmup": self.cfg.guard_rewarmup}  # fmt: skip

    def counts(self) -> dict:
        return {"skipped": self.st.skipped, "rollbacks": self.st.rollbacks}

    # -- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        d = dict(self.st.__dict__)
        d["history"] = [_json_float(x) for x in self.history.tolist()]
        d["snapshot_steps"] = [s.step for s in self.snapshots]
        d["snapshot_rng"] = [s.rng for s in self.snapshots]
        d["snapshot_param_groups"] = [s.optimizer["param_groups"] for s in self.snapshots]
        return d

    def load_state_dict(self, d: dict, where: str) -> None:
        try:
            own = {k: d[k] for k in GuardState().__dict__}
            bad = next((k for k, v in own.items() if not _STATE_TYPES[k](v)), None)
            if bad is not None:
                raise ValueError(f"{bad}={str(own[bad])[:40]}")
            steps, n = d.get("snapshot_steps") or [], len(d.get("snapshot_steps") or [])
            if not (_counts(steps) and _snapshot_list(d, "snapshot_rng", n, rng_ok)
                    and _snapshot_list(d, "snapshot_param_groups", n, _param_groups)):  # fmt: skip
                raise ValueError("the snapshot fields disagree or are malformed")
            self.st = GuardState(**own)
            hist = [float("nan") if x is None else float(x) for x in d["history"]]
            self.history = torch.tensor(hist, dtype=torch.float64, device=self.device)
        except (KeyError, TypeError, ValueError) as e:
            raise TrainingError(f"{where}: trainer state 'guard' is malformed ({e})") from None

    def save_snapshots(self, out_dir: Path, step: int) -> None:
        """guard.safetensors beside the checkpoint of ``step`` (its step is in the header,
        so a stale file from an earlier save is never used)."""
        tensors = {}
        for i, s in enumerate(self.snapshots):
            for k, v in s.model.items():
                tensors[f"{i}.model.{k}"] = v.detach().cpu().contiguous()
            for pid, st in s.optimizer["state"].items():
                for n, v in st.items():
                    tensors[f"{i}.opt.{pid}.{n}"] = v.detach().cpu().contiguous()
            tensors[f"{i}.history"] = s.history.cpu()
        meta = {"step": str(step), "count": str(len(self.snapshots))}
        tmp = Path(out_dir) / (GUARD_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, Path(out_dir) / GUARD_FILE)

    def load_snapshots(self, ckpt_dir: Path, step: int, saved: dict) -> None:
        """The snapshots saved with the checkpoint of ``step`` (none when the file is
        missing or belongs to another save: the guard then starts from no snapshot)."""
        path = Path(ckpt_dir) / GUARD_FILE
        steps = saved.get("snapshot_steps") or []
        if not steps or not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("step") != str(step) or meta.get("count") != str(len(steps)):
            return
        flat = load_file(str(path), device=str(self.device))
        snaps = []
        for i, s_step in enumerate(steps):
            model = {k.split(".", 2)[2]: v for k, v in flat.items() if k.startswith(f"{i}.model.")}
            state: dict[int, dict] = {}
            for k, v in flat.items():
                if k.startswith(f"{i}.opt."):
                    _, _, pid, name = k.split(".", 3)
                    state.setdefault(int(pid), {})[name] = v
            opt = {"state": state, "param_groups": saved["snapshot_param_groups"][i]}
            snaps.append(Snapshot(s_step, model, opt, flat[f"{i}.history"],
                                  saved["snapshot_rng"][i]))  # fmt: skip
        self.snapshots = snaps


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None
