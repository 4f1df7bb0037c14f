"""The run log: one JSON record per optimizer step in ``metrics.jsonl``, and a loss plot.

Records of every phase share the file (each names its ``phase``). A run resumed from
step k first drops the records of its phase past k (steps logged after the last save
of a crashed run), so the file always describes the run that the checkpoint continues.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from ..atomic import atomic_write

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """metrics.jsonl of one phase in ``out_dir`` (None: keep records in memory only).

    ``replace``: a fresh run over an old run directory; its first write starts a new file
    (not earlier, so a run that fails to start loses nothing).
    """

    def __init__(self, out_dir: Path | None, phase: str, replace: bool = False):
        self.path = None if out_dir is None else Path(out_dir) / METRICS_FILE
        self.phase, self.replace = phase, replace
        self.history: list[dict] = []  # the records of this session

    def append(self, records: list[dict]) -> None:
        self.history.extend(records)
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "w" if self.replace else "a"
        self.replace = False
        with open(self.path, mode, encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def _read(self) -> list[tuple[str, dict | None]]:
        """(line, parsed record or None) for every line of the file."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, AttributeError):
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                rec = None
            out.append((line, rec if isinstance(rec, dict) else None))
        return out

    def adopt(self, source_dir: Path) -> None:
        """Continue the log of the checkpoint being resumed when this run directory has
        none yet (resuming from a fallback copy, or into a new --out)."""
        src = Path(source_dir) / METRICS_FILE
        if self.path is None or self.path.exists() or not src.is_file():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, src.read_bytes())

    def drop_after(self, step: int) -> None:
        """Forget logged steps of this phase past ``step`` (a crash after the last save)."""
        lines = self._read()
        keep = [
            line
            for line, r in lines
            if r is not None and not (r.get("phase") == self.phase and r.get("step", 0) > step)
        ]
        if len(keep) != len(lines):
            atomic_write(self.path, "".join(x + "\n" for x in keep))

    def phase_records(self) -> list[dict]:
        """This phase's records from the file: after a resume a plot then shows the whole
        run, not only the steps of this session."""
        records = [r for _, r in self._read() if r is not None and r.get("phase") == self.phase]
        return records or self.history


def plot_losses(history: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """Write a PNG of train (and validation) loss against step; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True
