"""The training guard (engine/train/guard.py): faults injected from the test harness
(tests/fault_injection.py) -- a garbage batch, a NaN gradient, a learning rate far too high
for a few steps -- and the run still finishes near the clean run's validation loss; a run
interrupted in the middle of a recovery resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from fault_injection import inject
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.stop import StopRequest
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
from tritonlm.engine.train import loop as tr
from tritonlm.engine.train.guard import GUARD_FILE

TEXTS = [f"Line {i} tells of a {c} cat that sat on mat {i % 7}." for i in range(60) for c in "xy"]
CFG = dict(steps=40, batch_size=4, warmup=2, lr=3e-3, eval_every=20, val_fraction=0.2,
           log_every=4, device="cpu", guard_skips=2, guard_rewarmup=4)  # fmt: skip
TOLERANCE = 0.08  # relative, of the final validation loss (a fault unguarded: 5x worse)


@pytest.fixture(scope="module")
def tok():
    return BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300))


@pytest.fixture(scope="module")
def cache(tok, tmp_path_factory):
    return tc.build_pretrain_cache(TEXTS, tok, tmp_path_factory.mktemp("cache"))


def model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_seq_len=16)  # fmt: skip
    return Transformer(cfg)


def run(tok, cache, out=None, **overrides):
    cfg = tr.TrainConfig(**{**CFG, **overrides})
    return tr.train(model(tok.vocab_size), tok, cache, cfg, out)


@pytest.fixture(scope="module")
def clean(tok, cache):
    return run(tok, cache)


def events(result, kind):
    return [r for r in result.history if r.get("event") == kind]


def test_clean_run_has_no_guard_events(clean):
    assert clean.guard == {"skipped": 0, "rollbacks": 0}
    assert not [r for r in clean.history if "event" in r]


def test_garbage_batch_is_skipped(tok, cache, clean, monkeypatch, tmp_path):
    inject("garbage:30", monkeypatch.setattr)
    result = run(tok, cache, tmp_path / "run", guard_spike=1.5)
    assert result.status == "completed"
    (skip,) = events(result, "guard_skip")
    assert skip["step"] == 31 and skip["reason"] == "spike"  # data step 30 = optimizer step 31
    assert result.guard == {"skipped": 1, "rollbacks": 0}
    assert result.val_loss == pytest.approx(clean.val_loss, rel=TOLERANCE)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in logged if r.get("event") == "guard_skip"] == [skip]


def test_nan_gradient_is_skipped_and_without_guard_stops(tok, cache, clean, monkeypatch):
    inject("nangrad:10", monkeypatch.setattr)
    result = run(tok, cache)
    (skip,) = events(result, "guard_skip")
    assert skip["reason"] == "non-finite" and skip["grad_norm"] is None and skip["step"] == 11
    assert result.val_loss == pytest.approx(clean.val_loss, rel=TOLERANCE)
    with pytest.raises(tr.TrainingError, match="gradient norm became nan at step 11"):
        run(tok, cache, guard=False)


def test_learning_rate_too_high_rolls_back(tok, cache, clean, monkeypatch):
    inject("lr:15:3:300.0", monkeypatch.setattr)
    result = run(tok, cache)
    assert result.status == "completed" and result.step == 40
    (back,) = events(result, "guard_rollback")
    assert back["to_step"] < 16 <= back["step"]  # back to before the first bad update
    assert result.guard["rollbacks"] == 1 and result.guard["skipped"] >= 2
    assert result.val_loss == pytest.approx(clean.val_loss, rel=TOLERANCE)
    monkeypatch.undo()
    inject("lr:15:3:300.0", monkeypatch.setattr)
    unguarded = run(tok, cache, guard=False)  # the same fault without the guard: ruined
    assert unguarded.val_loss > 2 * clean.val_loss


def steps_and_losses(history):
    return [(r["step"], r["loss"]) for r in history if "event" not in r]


@pytest.mark.parametrize("moment", ["between skip and rollback", "during re-warmup"])
def test_interrupt_mid_recovery_resumes_exactly(moment, tok, cache, monkeypatch, tmp_path):
    inject("lr:15:3:300.0", monkeypatch.setattr)
    reference = run(tok, cache, tmp_path / "ref", save_every=8)
    stop = StopRequest()
    real_step = tr.Trainer.train_step

    def step(self, sb):
        real_step(self, sb)
        g = self.guard
        if moment == "between skip and rollback":
            hit = self.step == 19 and g.st.rollbacks == 0  # step 18 was skipped, not logged
        else:
            hit = g.st.rollbacks == 1 and self.step == g.st.rewarm_from + 2
        if hit:
            stop.request()

    monkeypatch.setattr(tr.Trainer, "train_step", step)
    out = tmp_path / "run"
    part = tr.train(model(tok.vocab_size), tok, cache,
                    tr.TrainConfig(**{**CFG, "save_every": 8}), out, stop=stop)  # fmt: skip
    assert part.status == "interrupted"
    assert (out / GUARD_FILE).is_file()
    monkeypatch.setattr(tr.Trainer, "train_step", real_step)
    ckpt = load_checkpoint(out)
    rest = tr.train(ckpt.model, tok, cache, tr.TrainConfig(**{**CFG, "save_every": 8}), out,
                    resume=ckpt)  # fmt: skip
    assert rest.status == "completed"
    assert steps_and_losses(part.history) + steps_and_losses(rest.history) == steps_and_losses(
        reference.history
    )
    assert rest.guard == reference.guard and rest.val_loss == reference.val_loss


def test_cli_prints_each_guard_event_and_counts_them(tmp_path, capsys, monkeypatch):
    from factories import run_cli
    from tritonlm.cli import train as cli

    data = tmp_path / "data.json"
    data.write_text(json.dumps(TEXTS))
    flags = ["--data", data, "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
             "--d-ff", "64", "--seq-len", "16", "--vocab-size", "300", "--batch-size", "4",
             "--steps", "12", "--log-every", "4", "--device", "cpu", "--quiet"]  # fmt: skip
    inject("nangrad:5", monkeypatch.setattr)
    rc, out, err = run_cli(cli.main, capsys, *flags, "--out", tmp_path / "a")
    assert rc == 0, err
    assert "pretrain: guard: skipped the update of step 6 (non-finite: loss " in err
    assert "guard: 1 skipped updates, 0 rollbacks" in out
    rc, out, err = run_cli(cli.main, capsys, *flags, "--out", tmp_path / "b", "--no-guard")
    assert rc == 2 and "gradient norm became nan at step 6" in err
