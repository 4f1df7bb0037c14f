"""Run llm-train with a fault injected from outside the product code (a test harness).

    python tests/fault_injection.py exit:RANK:STEP      <llm-train arguments>
    python tests/fault_injection.py hang:RANK:STEP      <llm-train arguments>
    python tests/fault_injection.py garbage:STEP        <llm-train arguments>
    python tests/fault_injection.py nangrad:STEP[:RANK] <llm-train arguments>
    python tests/fault_injection.py lr:STEP:K:FACTOR    <llm-train arguments>

exit / hang wrap the batch source: when rank RANK is asked for the batches of optimizer
step STEP (0-based; the prefetcher asks while step STEP - 1 trains), it leaves abruptly
(os._exit(17), like a crashed or OOM-killed process) or sleeps for an hour (a hung rank).

The training faults (for the guard) are keyed by the *data* step, the index of the batches
a step trains on (the guard moves past batches it rolled back over, so a fault is met once,
and a resumed run meets it exactly where the first run did):
  garbage  the batches of data step STEP hold uniformly random token ids
  nangrad  the gradient of one weight matrix is NaN in the step that trains on STEP
           (nangrad:STEP:RANK: on that torchrun rank only)
  lr       the learning rate is FACTOR times too high for the steps training on STEP..STEP+K-1
Under torchrun, launch this file instead of llm-train. ``inject`` works in-process too.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from tritonlm.cli.train import main
from tritonlm.engine.train import batches
from tritonlm.engine.train import loop as train_loop


def _data_step(trainer) -> int:
    return trainer.guard.data_step(trainer.step) if trainer.guard is not None else trainer.step


def _around_train_step(before, patch) -> None:
    """Call ``before(trainer, data_step)`` as each optimizer step starts; it may return a
    function to call once the step is done."""
    real = train_loop.Trainer.train_step

    def wrapped(self, sb):
        after = before(self, _data_step(self))
        try:
            return real(self, sb)
        finally:
            if after is not None:
                after()

    patch(train_loop.Trainer, "train_step", wrapped)


def inject(spec: str, patch=setattr) -> None:
    """Install the fault; ``patch(obj, name, value)`` (e.g. pytest's monkeypatch.setattr)."""
    kind, *nums = spec.split(":")
    nums = [float(n) if "." in n or "e" in n else int(n) for n in nums]
    if kind in ("exit", "hang"):
        rank, step = nums
        real = batches.StepPlanner.step

        def faulty(self, s: int):
            if self.rank == rank and s == step:
                if kind == "exit":
                    os._exit(17)
                time.sleep(3600)
            return real(self, s)

        patch(batches.StepPlanner, "step", faulty)
    elif kind == "garbage":
        (step,) = nums
        real_step = batches.StepPlanner.step

        def garbage(self, s: int):
            sb = real_step(self, s)
            if s == step:
                rng = np.random.default_rng(s)
                for bt in sb.micro:
                    vocab = int(max(bt.idx.max().item(), bt.targets.max().item())) + 1
                    bt.idx = torch.from_numpy(rng.integers(0, vocab, bt.idx.shape))
                    bt.targets = torch.from_numpy(rng.integers(0, vocab, bt.targets.shape))
            return sb

        patch(batches.StepPlanner, "step", garbage)
    elif kind == "nangrad":
        step, *only = nums  # nangrad:STEP[:RANK]

        def nan_grad(trainer, data_step):
            if data_step != step or (only and trainer.dist.rank != only[0]):
                return None
            weight = next(p for p in trainer.model.parameters() if p.dim() == 2)
            return weight.register_hook(lambda g: g * float("nan")).remove

        _around_train_step(nan_grad, patch)
    elif kind == "lr":
        step, k, factor = nums
        real_lr = train_loop.lr_at
        scale = [1.0]

        def lr_at(*a, **kw):
            return real_lr(*a, **kw) * scale[0]

        def high_lr(trainer, data_step):
            scale[0] = factor if step <= data_step < step + k else 1.0

        patch(train_loop, "lr_at", lr_at)
        _around_train_step(high_lr, patch)
    else:
        raise SystemExit(f"unknown fault {kind!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
