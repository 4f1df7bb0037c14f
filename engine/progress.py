"""A progress bar for training, fed by the trainer's progress events.

The trainer reports ``start`` / ``step`` / ``eval`` / ``save`` / ``done`` events; this
turns them into one tqdm bar per phase on a text stream (stderr by default). ``step``
events arrive every ``log_every`` steps, when the loop reads its metrics anyway, so the
bar never makes the loop wait for the device.
"""

from __future__ import annotations

import sys


class TrainingBar:
    """Call with each progress event; ``enabled=False`` shows nothing."""

    def __init__(self, enabled: bool = True, file=None):
        self.enabled, self.file = enabled, file or sys.stderr
        self.bar = None
        self.val: str | None = None

    def __call__(self, ev: dict) -> None:
        if not self.enabled:
            return
        kind = ev["event"]
        if kind == "start":
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=ev["total_steps"], initial=ev["step"], desc=ev["phase"],
                            unit="step", file=self.file, dynamic_ncols=True)  # fmt: skip
        elif kind == "step" and self.bar is not None:
            if "val_loss" in ev:
                self.val = f"{ev['val_loss']:.3f}"
            post = {"loss": f"{ev['loss']:.3f}", "tok/s": f"{ev['tokens_per_s']:.0f}"}
            if self.val:
                post["val"] = self.val
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(ev["step"] - self.bar.n)
        elif kind == "done":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.val = None
