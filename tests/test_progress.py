"""The training progress display (engine/progress.py): a bar on a terminal, plain lines
elsewhere (CI logs, nohup, schedulers), never a pile of carriage returns in a log."""

from __future__ import annotations

import io

from tritonlm.cli.progress import TrainingBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


EVENTS = [
    {"event": "start", "phase": "pretrain", "step": 0, "total_steps": 30},
    *({"event": "step", "phase": "pretrain", "step": s, "total_steps": 30, "loss": 5.0 - s / 10,
       "tokens_per_s": 1000.0, **({"val_loss": 4.5} if s == 20 else {})}
      for s in (10, 20, 30)),
    {"event": "done", "phase": "pretrain", "status": "completed", "step": 30, "total_steps": 30},
]  # fmt: skip


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = TrainingBar(file=out, interval=0.0)
    for ev in EVENTS:
        bar(ev)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "pretrain: step 0/30"
    assert lines[2].startswith("pretrain: step 20/30 loss 3.000 val 4.500 1000 tok/s eta")
    assert lines[-1] == "pretrain: completed at step 30/30" and len(lines) == 5


def test_plain_lines_are_rate_limited():
    out = io.StringIO()
    bar = TrainingBar(file=out, interval=3600.0)
    for ev in EVENTS:
        bar(ev)
    assert out.getvalue().splitlines() == ["pretrain: step 0/30",
                                           "pretrain: completed at step 30/30"]  # fmt: skip


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    term = Terminal()
    bar = TrainingBar(file=term)
    for ev in EVENTS:
        bar(ev)
    assert "\r" in term.getvalue() and "30/30" in term.getvalue()
    quiet = io.StringIO()
    off = TrainingBar(enabled=False, file=quiet)
    for ev in EVENTS:
        off(ev)
    assert quiet.getvalue() == ""


def test_a_phase_without_validation_ends_with_a_line():
    out = io.StringIO()
    bar = TrainingBar(file=out, interval=0.0)
    bar(EVENTS[0])
    bar({**EVENTS[-1], "val_loss": None, "loss": 4.0})  # what the trainer reports at the end
    assert out.getvalue().splitlines()[-1] == "pretrain: completed at step 30/30"
