"""Run llm-train with a fault injected from outside the product code (a test harness).

    python tests/fault_injection.py exit:RANK:STEP  <llm-train arguments>
    python tests/fault_injection.py hang:RANK:STEP  <llm-train arguments>

Wraps the batch source: when rank RANK is asked for the batches of optimizer step STEP
(0-based; the prefetcher asks while step STEP - 1 trains), it leaves abruptly
(os._exit(17), like a crashed or OOM-killed process) or sleeps for an hour (a hung rank).
Under torchrun, launch this file instead of llm-train.
"""

from __future__ import annotations

import os
import sys
import time

from tritonlm.cli.train import main
from tritonlm.engine.train import batches


def inject(spec: str) -> None:
    kind, rank, step = spec.split(":")
    rank, step = int(rank), int(step)
    if kind not in ("exit", "hang"):
        raise SystemExit(f"unknown fault {kind!r}")
    real = batches.StepPlanner.step

    def faulty(self, s: int):
        if self.rank == rank and s == step:
            if kind == "exit":
                os._exit(17)
            time.sleep(3600)
        return real(self, s)

    batches.StepPlanner.step = faulty


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
