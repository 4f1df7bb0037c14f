"""Crash injection at every filesystem step of a checkpoint save and of a resume.

A crash is simulated by raising ``Crash`` (a BaseException our cleanup code does not
catch, like ``kill -9`` runs no cleanup) at the k-th call of any filesystem operation
(rename, replace, unlink, rmdir, mkdir, fsync, copy), for k = 1, 2, ... until the
operation completes. After each crash: the loader finds a complete checkpoint, it is the
old or the new state (never a mix), its metrics history is whole, and the next save
cleans up. Disk-full errors (OSError at step k) are tried the same way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.run_plan import check_run_dir

TEXTS = [f"Entry {i} is about {c} boats on lake {i % 5}." for i in range(50) for c in "pq"]
FS_CALLS = [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
            (os, "fsync"), (shutil, "copy2"), (shutil, "copytree")]  # fmt: skip


class Crash(BaseException):
    """The process died here."""


class Injector:
    """Counts filesystem calls; the k-th one raises ``error`` instead of running."""

    def __init__(self, monkeypatch, k: int, error: BaseException):
        self.k, self.n, self.error, self.fired = k, 0, error, False
        for mod, name in FS_CALLS:
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, real):
        def call(*a, **kw):
            self.n += 1
            if self.n == self.k:
                self.fired = True
                raise self.error
            return real(*a, **kw)

        return call


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=290)


SHAPE = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)


def weights_id(ckpt) -> float:
    return float(ckpt.model.tok_emb.weight.sum())


def log(dir_: Path, steps) -> None:
    with open(dir_ / "metrics.jsonl", "a") as f:
        for s in steps:
            f.write(json.dumps({"phase": "pretrain", "step": s, "loss": 1.0 / s}) + "\n")


def logged(dir_: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (dir_ / "metrics.jsonl").read_text().splitlines()]


START_STATES = ["complete", "complete + stale fallback", "only fallback",
                "fallback + log-only dir", "stale temporaries"]  # fmt: skip


def make_start(state: str, root: Path, tok, shard_size: str = "5GB") -> Path:
    run = root / "run"
    save_checkpoint(run, tiny_model(tok, SHAPE, seed=1), tok, max_shard_size=shard_size)
    log(run, [1, 2, 3])
    old = root / ".run.old"
    if state == "complete + stale fallback":
        shutil.copytree(run, old)
    elif state in ("only fallback", "fallback + log-only dir"):
        run.rename(old)
        if state == "fallback + log-only dir":
            run.mkdir()
            shutil.copy2(old / "metrics.jsonl", run / "metrics.jsonl")
    elif state == "stale temporaries":
        (root / ".run.tmp-0123456789ab").mkdir()
        (root / ".run.tmp-0123456789ab" / "model.safetensors").write_bytes(b"half")
    return run


@pytest.mark.parametrize("state", START_STATES)
@pytest.mark.parametrize("kind", ["crash", "disk full"])
def test_save_survives_a_failure_at_every_step(state, kind, tok, tmp_path, monkeypatch):
    fail_at_every_step(state, kind, tok, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "kind, before, after",
    [("crash", "8KB", "4KB"), ("disk full", "5GB", "8KB")],
)
def test_resharding_survives_a_failure_at_every_step(kind, before, after, tok, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """From shards to more shards, from one file to shards: never a mix of
    the two sets (the manifest hashes every shard, so a mix could not load)."""
    fail_at_every_step("complete", kind, tok, tmp_path, monkeypatch, before, after)


def fail_at_every_step(state, kind, tok, tmp_path, monkeypatch, before="5GB", after="5GB"):
    """Save over ``state`` (weights in shards of ``before``, the new ones in shards of
    ``after``) with a failure at filesystem call k, for every k."""
    new = tiny_model(tok, SHAPE, seed=2)
    k = 0
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        root.mkdir()
        run = make_start(state, root, tok, before)
        old_id = weights_id(load_checkpoint(run))
        temps_before = set(root.glob(".run.tmp-*"))
        error = Crash() if kind == "crash" else OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            inj = Injector(m, k, error)
            try:
                save_checkpoint(run, new, tok, max_shard_size=after)
            except Crash:
                pass
            except CheckpointError as e:  # an OS error: one clear line naming the path
                assert kind == "disk full" and "cannot write the checkpoint" in str(e)
                assert "\n" not in str(e)
        ckpt = load_checkpoint(run)  # some complete checkpoint, whatever step failed
        assert weights_id(ckpt) in (old_id, float(new.tok_emb.weight.sum()))
        assert logged(ckpt.path) == [1, 2, 3]  # the history survives
        assert check_run_dir(run) == run  # `--resume run --out run` is accepted
        if kind == "disk full":
            assert set(root.glob(".run.tmp-*")) <= temps_before  # an error cleans up its own
        save_checkpoint(run, new, tok, max_shard_size=after)  # the next save repairs everything
        assert sorted(p.name for p in root.iterdir()) == ["run"]
        manifest = json.loads((run / "manifest.json").read_text())["files"]
        assert sorted(manifest) == sorted({p.name for p in run.iterdir()} - {"manifest.json",
                                          "metrics.jsonl"})  # no stale shard  # fmt: skip
        assert logged(run) == [1, 2, 3]
        assert weights_id(load_checkpoint(run)) == float(new.tok_emb.weight.sum())
        if not inj.fired:
            break
    assert k > 8  # every step of the save was tried


def test_resume_survives_a_crash_at_every_step(tok, tmp_path, monkeypatch):
    """Resume from the fallback copy (the state after a crash between the two renames),
    train 3 steps saving each one; crash at every filesystem call of that whole run."""
    cache = tc.build_pretrain_cache(TEXTS, tok, tmp_path / "cache")
    cfg = tr.TrainConfig(steps=6, batch_size=2, warmup=1, eval_every=0, save_every=1,
                         log_every=1, val_fraction=0.0, device="cpu")  # fmt: skip
    first = tmp_path / "first" / "run"
    stop = tr.StopRequest()
    real_step = tr.Trainer.train_step

    def step_then_stop(self, sb):
        real_step(self, sb)
        if self.step == 3:
            stop.request()

    monkeypatch.setattr(tr.Trainer, "train_step", step_then_stop)
    tr.train(tiny_model(tok, SHAPE, seed=3), tok, cache, cfg, first, stop=stop)
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    k = 0
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        shutil.copytree(first.parent, root)
        run = root / "run"
        run.rename(root / ".run.old")  # crashed between "old aside" and "new in"
        with monkeypatch.context() as m:
            inj = Injector(m, k, Crash())
            try:
                ckpt = load_checkpoint(check_run_dir(run))
                tr.train(ckpt.model, tok, cache, cfg, run, resume=ckpt)
            except Crash:
                pass
        ckpt = load_checkpoint(run)
        step = ckpt.trainer_state["step"]
        assert 3 <= step <= 6
        assert logged(ckpt.path)[:step] == list(range(1, step + 1))  # history is whole
        assert check_run_dir(run) == run
        if not inj.fired:
            assert step == 6 and sorted(p.name for p in root.iterdir()) == ["run"]
            break
    assert k > 10
