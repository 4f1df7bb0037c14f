"""A progress bar for training, fed by the trainer's progress events.

The trainer reports ``start`` / ``step`` / ``eval`` / ``save`` / ``done`` events; this
turns them into one tqdm bar per phase on a terminal (stderr by default). ``step`` events
arrive every ``log_every`` steps, when the loop reads its metrics anyway, so the bar never
makes the loop wait for the device. When the stream is not a terminal (a CI log, nohup, a
scheduler) a redrawn bar would pile ``\r`` frames into one line; it gets one plain line
every ``interval`` seconds instead, and one at the end of each phase.
"""

from __future__ import annotations

import sys
import time


class TrainingBar:
    """Call with each progress event; ``enabled=False`` shows nothing."""

    def __init__(self, enabled: bool = True, file=None, interval: float = 10.0):
        self.enabled, self.file = enabled, file or sys.stderr
        self.bar = None
        self.val: str | None = None
        isatty = getattr(self.file, "isatty", None)
        self.plain = not (isatty is not None and isatty())
        self.interval, self.last_line = interval, 0.0

    def __call__(self, ev: dict) -> None:
        if ev["event"].startswith("guard_"):  # shown even with --quiet: the run changed course
            self._guard(ev)
            return
        if not self.enabled:
            return
        if self.plain:
            self._line(ev)
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
            post = {"loss": _num(ev["loss"]), "tok/s": f"{ev['tokens_per_s']:.0f}"}
            if self.val:
                post["val"] = self.val
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(ev["step"] - self.bar.n)
        elif kind == "done":
            self.close()

    def _line(self, ev: dict) -> None:
        """Plain-text progress: a line at start, every ``interval`` s, and at the end."""
        kind, now = ev["event"], time.monotonic()
        if kind == "step" and ev.get("val_loss") is not None:
            self.val = f"{ev['val_loss']:.3f}"
        if kind == "start":
            self.t0, self.step0, self.total = now, ev["step"], ev["total_steps"]
            text = f"{ev['phase']}: step {ev['step']}/{ev['total_steps']}"
        elif kind == "step" and now - self.last_line >= self.interval:
            done = ev["step"] - self.step0
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.total - ev["step"]) / rate if rate > 0 else 0.0
            val = f" val {self.val}" if self.val else ""
            text = (f"{ev['phase']}: step {ev['step']}/{self.total} loss {_num(ev['loss'])}{val} "
                    f"{ev['tokens_per_s']:.0f} tok/s eta {eta:.0f}s")  # fmt: skip
        elif kind == "done":
            text = f"{ev['phase']}: {ev['status']} at step {ev['step']}/{ev['total_steps']}"
            self.val = None
        else:
            return
        self.last_line = now
        print(text, file=self.file, flush=True)

    def _guard(self, ev: dict) -> None:
        """One line per guard event (a skipped update, a rollback)."""
        if ev["event"] == "guard_skip":
            text = (f"{ev['phase']}: guard: skipped the update of step {ev['step']} "
                    f"({ev['reason']}: loss {_num(ev['step_loss'])}, "
                    f"grad norm {_num(ev['grad_norm'])})")  # fmt: skip
        else:
            lo, hi = ev["skipped_batches"]
            text = (f"{ev['phase']}: guard: rolled back from step {ev['step']} to step "
                    f"{ev['to_step']}, skipping the batches of data steps {lo}..{hi - 1}, "
                    f"re-warming the learning rate over {ev['rewarmup']} steps")  # fmt: skip
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.val = None


def _num(x: float | None) -> str:
    return "nan" if x is None else f"{x:.3f}"
