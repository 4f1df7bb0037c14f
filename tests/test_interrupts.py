"""Stop requests (engine/stop.py + the trainer's step boundaries + llm-train's handlers).

A Ctrl-C or SIGTERM may arrive at any moment; the checkpoint it leads to must always be a
state the run was really in, so resuming it reproduces the uninterrupted run exactly.
Signals are real (``signal.raise_signal`` in this process, ``send_signal`` to a child)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from factories import tiny_model, tiny_tokenizer
from procs import running, signal_and_wait, wait_until
from tritonlm.cli import train as cli
from tritonlm.engine.checkpoint import checkpoint_store as store
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.stop import StopRequest
from tritonlm.engine.train import loop as tr

SCRIPT = Path(sys.executable).parent / "llm-train"
TEXTS = [f"Line {i} tells of a {c} cat that sat on mat {i % 7}." for i in range(60) for c in "xy"]
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--seq-len",
        "16", "--vocab-size", "300", "--batch-size", "4", "--threads", "1", "--quiet",
        "--device", "cpu", "--warmup", "1", "--lr", "3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def cache(tok, tmp_path_factory):
    return tc.build_pretrain_cache(TEXTS, tok, tmp_path_factory.mktemp("cache"))


SHAPE = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16, dropout=0.1)


CFG = dict(steps=8, batch_size=4, grad_accum=2, warmup=1, lr=3e-3, eval_every=3,
           save_every=2, val_fraction=0.2, log_every=3, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def reference(tok, cache, tmp_path_factory):
    """Losses of the uninterrupted run, by step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = tr.train(tiny_model(tok, SHAPE), tok, cache, tr.TrainConfig(**CFG), out)
    return {r["step"]: r for r in result.history}


def _at(step_of, when: int, stop: StopRequest, real):
    """Wrap ``real`` so that, at trainer step ``when``, a real SIGINT arrives as it starts."""

    def wrapped(*a, **k):
        if step_of() == when and not stop:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    return wrapped


MOMENTS = ["optimizer step", "evaluation", "periodic save", "progress report"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_interrupt_at_any_moment_resumes_exactly(moment, tok, cache, reference, tmp_path,
                                                 monkeypatch):  # fmt: skip
    stop = StopRequest().install()
    assert signal.getsignal(signal.SIGINT) == stop.handle_signal  # the signal is really ours
    trainer_box = {}
    real_init = tr.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        trainer_box["t"] = self
        step = lambda: self.step  # noqa: E731
        if moment == "optimizer step":
            self.optimizer.step = _at(step, 4, stop, self.optimizer.step)  # inside step 5
        elif moment == "evaluation":
            self.evaluate = _at(step, 3, stop, self.evaluate)
        elif moment == "progress report":
            self.progress = _at(step, 3, stop, lambda ev: None)

    monkeypatch.setattr(tr.Trainer, "__init__", init)
    if moment == "periodic save":  # halfway through writing the step-4 checkpoint
        trainer = lambda: trainer_box["t"].step  # noqa: E731
        monkeypatch.setattr(store, "rename_path", _at(trainer, 4, stop, store.rename_path))
    out = tmp_path / "run"
    try:
        with stop.deferred():
            part = tr.train(tiny_model(tok, SHAPE), tok, cache, tr.TrainConfig(**CFG), out,
                            stop=stop)  # fmt: skip
    finally:
        stop.uninstall()
    monkeypatch.setattr(tr.Trainer, "__init__", real_init)
    expect_step = {"optimizer step": 5, "evaluation": 3, "periodic save": 4,
                   "progress report": 3}[moment]  # fmt: skip
    assert part.status == "interrupted" and part.step == expect_step
    assert [r["loss"] for r in part.history] == [reference[s]["loss"] for s in
                                                 range(1, expect_step + 1)]  # fmt: skip
    ckpt = load_checkpoint(out)
    assert ckpt.trainer_state["step"] == expect_step
    rest = tr.train(ckpt.model, tok, cache, tr.TrainConfig(**CFG), out, resume=ckpt)
    assert rest.status == "completed"
    assert {r["step"]: r["loss"] for r in rest.history} == {
        s: reference[s]["loss"] for s in range(expect_step + 1, 9)
    }  # bitwise: the saved state is one the uninterrupted run was in
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))


def _logged(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}


def test_cli_ctrl_c_then_ctrl_c_in_the_token_cache_build_then_resume(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """llm-train in this process: Ctrl-C inside step 4 saves step 4 (exit 130); a resume
    interrupted while it tokenizes saves nothing and leaves that checkpoint untouched; the
    next resume finishes onto exactly the losses of an uninterrupted run."""
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(TEXTS))
    base = [*TINY, "--data", str(data), "--steps", "8", "--eval-every", "3"]
    assert cli.main([*base, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "run"
    real_step = tr.Trainer.train_step

    def step(self, sb):
        if self.step == 3:  # inside the 4th step
            signal.raise_signal(signal.SIGINT)
        real_step(self, sb)

    monkeypatch.setattr(tr.Trainer, "train_step", step)
    assert cli.main([*base, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "stopping after this step" in err and f"--resume {out}" in err and "step 4" in err
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    manifest = (out / "manifest.json").read_text()
    real_entry = tc.write_entry

    def entry(*a, **k):
        signal.raise_signal(signal.SIGINT)  # nothing to save yet: stops at once
        return real_entry(*a, **k)

    monkeypatch.setattr(tc, "write_entry", entry)
    other = tmp_path / "other-cache"
    resume = [*base, "--out", str(out), "--resume", str(out)]
    assert cli.main([*resume, "--cache-dir", str(other)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == manifest  # the checkpoint is untouched
    assert not [p for p in other.iterdir() if "tmp" in p.name]  # no half-built cache
    monkeypatch.setattr(tc, "write_entry", real_entry)
    assert cli.main(resume) == 0
    assert load_checkpoint(out).trainer_state["step"] == 8
    assert _logged(out) == _logged(tmp_path / "full")  # bitwise, step by step


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a background job of `sh -c` inherits


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_works_even_when_the_parent_ignores_sigint(sig, tmp_path):
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(TEXTS))
    out = tmp_path / "run"
    argv = [*TINY, "--data", data, "--out", out, "--steps", "100000", "--eval-every", "0",
            "--log-every", "1"]  # fmt: skip
    metrics = out / "metrics.jsonl"
    with running([SCRIPT, *argv], preexec_fn=_ignore_sigint) as proc:
        wait_until(proc, lambda: metrics.exists() and metrics.stat().st_size > 0)
        err = signal_and_wait(proc, sig)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and "Traceback" not in err
    assert "resumable checkpoint saved" in err
    state = load_checkpoint(out).trainer_state
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == logged[-1] >= 1  # saved exactly where the log ends


def test_second_ctrl_c_aborts_without_saving(tmp_path):
    """Deterministic: both signals arrive inside ``deferred()`` before any save."""
    code = (
        "import signal, sys, time\n"
        "from tritonlm.engine.stop import StopRequest\n"
        "s = StopRequest().install()\n"
        "s.on_first = lambda n: print('first', n, file=sys.stderr, flush=True)\n"
        "s.on_abort = lambda n: print('abort', n, file=sys.stderr, flush=True)\n"
        "with s.deferred():\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    assert s.reason == 'SIGINT'\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=_ignore_sigint)  # fmt: skip
    assert r.returncode == 130
    assert r.stderr.splitlines() == ["first SIGINT", "abort SIGINT"]
    assert "not reached" not in r.stdout


def test_two_quick_ctrl_c_leave_a_loadable_checkpoint(tmp_path):
    """Whichever way the race goes (abort or a finished save), exit 130 and the run
    directory holds a complete checkpoint: the last periodic one or the interrupt's."""
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(TEXTS))
    out = tmp_path / "run"
    argv = [*TINY, "--data", data, "--out", out, "--steps", "100000", "--eval-every", "0",
            "--save-every", "3", "--log-every", "1"]  # fmt: skip
    with running([SCRIPT, *argv]) as proc:
        wait_until(proc, lambda: (out / "manifest.json").exists())
        err = signal_and_wait(proc, signal.SIGINT, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert load_checkpoint(out).trainer_state["step"] >= 3


def test_a_stop_swallowed_before_training_still_stops_it():
    """A KeyboardInterrupt raised outside ``deferred()`` may be swallowed by library code
    (an exception in a ``__del__`` or a weakref callback is only printed); the request is
    remembered and the run stops when training would start."""
    stop = StopRequest()
    try:
        stop.handle_signal(signal.SIGINT, None)  # what the signal does before training
    except KeyboardInterrupt:
        pass  # ... swallowed somewhere
    assert stop.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        with stop.deferred():
            raise AssertionError("training must not start")
