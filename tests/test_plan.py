"""llm-train --plan (engine/train/plan.py, cli/train_plan.py): the memory model against the
peak RSS of real training steps, the micro-batch that fits, the JSON plan, --batch-size auto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import run_cli
from tritonlm.cli import train as cli
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.train import plan
from tritonlm.engine.train.train_config import TrainConfig

PROBE = Path(__file__).parent / "memory_probe.py"
TEXTS = [f"Line {i} tells of a {c} cat that sat on mat {i % 7}." for i in range(60) for c in "xy"]
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--seq-len",
        "16", "--vocab-size", "300", "--threads", "1", "--device", "cpu", "--quiet"]  # fmt: skip

# (preset, vocab, batch, seq_len): every preset, several batch sizes and lengths; gpt2
# small enough for a CI machine (its weights, AdamW and the guard's snapshots dominate).
CASES = [("seed", 512, 4, 80), ("seed", 512, 32, 40), ("small", 4096, 8, 256),
         ("small", 4096, 32, 64), ("gpt2", 8192, 1, 64), ("gpt2", 8192, 2, 128)]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_memory_model_within_15_percent_of_measured_rss(case):
    """Each case in a fresh process, so its peak RSS is its own."""
    preset, vocab, batch, seq = case
    argv = [sys.executable, str(PROBE), preset, str(vocab), str(batch), str(seq)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    predicted, peak = got["predicted"]["peak_bytes"], got["peak"]
    assert abs(predicted - peak) <= 0.15 * peak, (predicted >> 20, peak >> 20)


def test_memory_model_without_guard_is_smaller_by_the_snapshots():
    cfg = ModelConfig.preset("small", 4096)
    cpu = torch.device("cpu")
    on = plan.memory_at(cfg, TrainConfig(), cpu, 8, 128, resident=0)
    off = plan.memory_at(cfg, TrainConfig(guard=False), cpu, 8, 128, resident=0)
    assert on["peak_bytes"] - off["peak_bytes"] == on["guard"] == 24 * cfg.num_parameters()


def test_fit_batch_is_the_largest_that_fits(monkeypatch):
    cfg = ModelConfig.preset("small", 4096)
    cpu = torch.device("cpu")
    config = TrainConfig(batch_size=48, grad_accum=2)
    budget = plan.memory_at(cfg, config, cpu, 21, 256, resident=0)["peak_bytes"] + 1
    monkeypatch.setattr(plan, "available_memory", lambda device: budget)
    fit = plan.fit_batch(cfg, config, cpu, 256, resident=0)
    assert fit["max_micro_batch"] == 21
    assert fit["global_batch"] == 96
    assert (fit["micro_batch"], fit["grad_accum"]) == (16, 6)  # the largest divisor <= 21
    monkeypatch.setattr(plan, "available_memory", lambda device: 1000)
    assert plan.fit_batch(cfg, config, cpu, 256, resident=0)["micro_batch"] == 0


def test_cli_plan_json_trains_nothing(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TEXTS))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(cli.main, capsys, "--data", data, "--out", out, "--steps", "50",
                              "--batch-size", "4", "--grad-accum", "2", *TINY, "--plan",
                              "--json")  # fmt: skip
    assert rc == 0, err
    p = json.loads(stdout)
    assert p["phase"] == "pretrain" and p["steps"] == 50 and p["seq_len"] == 16
    assert p["tokens_per_step"] == 4 * 2 * 16
    assert p["epochs"] == pytest.approx(50 * 8 / p["train_examples"])
    assert p["parameters"] == p["checkpoint_bytes"]["weights"] // 4
    assert p["peak_bytes"] == p["memory"]["peak_bytes"] > 0
    assert len(p["probe"]["step_seconds"]) == 3 and p["probe"]["expected_seconds"] > 0
    assert p["fit"]["micro_batch"] == 8 and p["fit"]["grad_accum"] == 1  # all 8 fit at once
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()
    rc, stdout, err = run_cli(cli.main, capsys, "--data", data, "--out", out, "--steps", "50",
                              *TINY, "--plan")  # fmt: skip
    assert rc == 0 and "expected time" in stdout and "peak (process RSS)" in stdout


def test_json_without_plan_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run_cli(cli.main, capsys, "--data", tmp_path / "x.json", "--out",
                         tmp_path / "run", "--json")  # fmt: skip
    assert rc == 2 and "--json goes with --plan" in err


def test_batch_size_auto_keeps_the_global_batch(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TEXTS))
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16)
    resident = plan.resident_bytes()
    budget = plan.memory_at(cfg, TrainConfig(), torch.device("cpu"), 5, 16, resident)
    monkeypatch.setattr(plan, "resident_bytes", lambda: resident)
    monkeypatch.setattr(plan, "available_memory",
                        lambda device: budget["peak_bytes"] - resident + 1)  # fmt: skip
    rc, stdout, err = run_cli(cli.main, capsys, "--data", data, "--out", tmp_path / "run",
                              "--steps", "2", *TINY[:-1], "--batch-size", "auto")  # fmt: skip
    assert rc == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 4)  # 16 = 4 (largest <= 5) x 4
    assert "batch size auto: --batch-size 4 --grad-accum 4" in stdout
