"""A progress bar in bytes (MB/s and ETA) for reading a corpus, fed ``(done, total)``.

The same habits as `TrainingBar` (engine/progress.py): a tqdm bar on a terminal (stderr
by default); when the stream is not a terminal, one plain line every ``interval`` seconds
and one at the end, so a log never fills with redrawn frames. ``total`` 0 means unknown
(no ETA). A phase shorter than ``interval`` prints nothing when plain.
"""

from __future__ import annotations

import sys
import time


class ByteBar:
    """Call with ``(done_bytes, total_bytes)``; ``close()`` ends the bar."""

    def __init__(self, desc: str, enabled: bool = True, file=None, interval: float = 10.0):
        self.desc, self.enabled, self.file = desc, enabled, file or sys.stderr
        isatty = getattr(self.file, "isatty", None)
        self.plain = not (isatty is not None and isatty())
        self.interval, self.bar = interval, None
        self.t0 = self.last = time.monotonic()
        self.done = self.total = 0
        self.printed = False  # a short phase prints nothing in plain mode

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        self.done, self.total = done, total
        if self.plain:
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last, self.printed = now, True
                print(self._line(now), file=self.file, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, desc=self.desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=self.file, dynamic_ncols=True)  # fmt: skip
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)
        text = f"{self.desc}: {self.done / 2**20:.1f} MiB, {rate / 2**20:.1f} MiB/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            text += f", {100 * self.done / self.total:.0f}% of {self.total / 2**20:.1f} MiB"
            text += f", eta {eta:.0f}s"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.plain and self.printed:
            print(self._line(time.monotonic()), file=self.file, flush=True)
        self.done = 0
