"""llm-train end to end: --help, a tiny successful run, Ctrl-C + --resume, and every bad
input giving one stderr line and exit code 2 (in-process and through the installed script).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chat_fixtures import TINY_TRAIN
from factories import run_cli
from tritonlm.cli import train as cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "llm-train"

TINY = TINY_TRAIN


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    texts = [f"Sentence number {i} is about the color {c}." for i in range(40) for c in "ab"]
    (d / "pre.json").write_text(json.dumps(texts))
    chats = [f"User: What is {w}? Assistant: {w} is a word." for w in ("sun", "moon", "sky")]
    (d / "chat.json").write_text(json.dumps(chats * 4))
    (d / "empty.json").write_text(json.dumps(["", "  "]))
    (d / "bad.json").write_text("[1, 2")
    (d / "notalist.json").write_text('{"a": 1}')
    (d / "badchat.json").write_text(json.dumps(["no role markers here"]))
    (d / "tok.json").write_text("{not a tokenizer")
    (d / "afile").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("precious")
    return d


def run_ok(argv, capsys):
    code, out, err = run_cli(cli.main, capsys, *argv)
    assert code == 0, err
    return out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files):
    """One tiny pretrain + SFT run shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = [*TINY, "--data", files / "pre.json", "--chat-data", files / "chat.json"]
    argv += ["--out", out, "--pretrain-steps", "4", "--sft-steps", "3", "--eval-every", "2"]
    code = cli.main([str(a) for a in argv])
    assert code == 0
    return out


def test_help_lists_options_and_examples(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--data", "--chat-data", "--out", "--preset", "--vocab-size", "--steps",
                "--epochs", "--pretrain-steps", "--sft-steps", "--resume", "--init-from",
                "--patience", "--grad-accum", "--backend", "examples:", "default: 16"):  # fmt: skip
        assert opt in out, opt


def test_success_writes_loadable_checkpoint(trained):
    ckpt = load_checkpoint(trained)
    assert ckpt.model.config.d_model == 32 and ckpt.tokenizer.vocab_size <= 300
    assert ckpt.trainer_state["phase"] == "sft" and ckpt.trainer_state["step"] == 3
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in records] == [
        ("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("pretrain", 4),
        ("sft", 1), ("sft", 2), ("sft", 3),
    ]  # fmt: skip
    assert (trained / "loss_pretrain.png").exists() and (trained / "loss_sft.png").exists()


def test_success_prints_checkpoint_path(files, tmp_path, capsys):
    out_dir = tmp_path / "sft-only"
    out, _ = run_ok(
        [*TINY, "--chat-data", files / "chat.json", "--out", out_dir, "--steps", "2",
         "--eval-every", "0"],
        capsys,
    )  # fmt: skip
    assert f"checkpoint: {out_dir}" in out
    assert load_checkpoint(out_dir).trainer_state["phase"] == "sft"


def test_init_from_keeps_tokenizer_and_shape(trained, files, tmp_path, capsys):
    out_dir = tmp_path / "ft"
    run_ok(
        ["--init-from", trained, "--chat-data", files / "chat.json", "--out", out_dir,
         "--steps", "2", "--eval-every", "0", "--quiet", "--threads", "1"],
        capsys,
    )  # fmt: skip
    a, b = load_checkpoint(trained), load_checkpoint(out_dir)
    assert a.tokenizer.to_dict() == b.tokenizer.to_dict()
    assert a.model_config == b.model_config


# ----------------------------------------------------------------------------- bad inputs


def bad_cases(d: Path, ckpt: Path, broken: Path):
    pre, chat = str(d / "pre.json"), str(d / "chat.json")
    out = str(d / "out-never")
    return {
        "no data": ["--out", out],
        "no out": ["--data", pre],
        "missing file": ["--data", str(d / "nope.json"), "--out", out],
        "malformed json": ["--data", str(d / "bad.json"), "--out", out],
        "not a list": ["--data", str(d / "notalist.json"), "--out", out],
        "empty data": ["--data", str(d / "empty.json"), "--out", out],
        "bad chat": ["--chat-data", str(d / "badchat.json"), "--out", out],
        "steps zero": ["--data", pre, "--out", out, "--steps", "0"],
        "steps text": ["--data", pre, "--out", out, "--steps", "many"],
        "lr negative": ["--data", pre, "--out", out, "--lr", "-1"],
        "lr nan": ["--data", pre, "--out", out, "--lr", "nan"],
        "dropout one": ["--data", pre, "--out", out, "--dropout", "1"],
        "steps and epochs": ["--data", pre, "--out", out, "--steps", "3", "--epochs", "1"],
        "unknown option": ["--data", pre, "--out", out, "--stepz", "3"],
        "bad preset": ["--data", pre, "--out", out, "--preset", "huge"],
        "heads not dividing": ["--data", pre, "--out", out, "--d-model", "30", "--n-heads", "4"],
        "min lr above lr": ["--data", pre, "--out", out, "--min-lr", "1", "--lr", "0.1"],
        "sft steps without chats": ["--data", pre, "--out", out, "--sft-steps", "3"],
        "bad tokenizer file": ["--data", pre, "--out", out, "--tokenizer", str(d / "tok.json")],
        "corrupted checkpoint": ["--init-from", str(broken), "--data", pre, "--out", out],
        "missing checkpoint": ["--resume", str(d / "nockpt"), "--data", pre, "--out", out],
        "seq len over checkpoint": [
            "--init-from",
            str(ckpt),
            "--data",
            pre,
            "--out",
            out,
            "--seq-len",
            "64",
        ],  # fmt: skip
        "resume with other phase data": ["--resume", str(ckpt), "--data", pre, "--out", out],
        "out is a file": ["--data", pre, "--out", str(d / "afile")],
        "out not empty": ["--data", pre, "--out", str(d / "full")],
        "corpus too small": [
            "--data",
            pre,
            "--out",
            out,
            "--seq-len",
            "4096",
            "--steps",
            "1",
            "--vocab-size",
            "300",
            "--d-model",
            "32",
            "--n-layers",
            "1",
            "--n-heads",
            "2",
            "--d-ff",
            "32",
        ],  # fmt: skip
        "chat tokens tiny model": ["--chat-data", chat, "--out", out, "--vocab-size", "10"],
    }


@pytest.fixture(scope="module")
def broken_ckpt(trained, tmp_path_factory):
    import shutil

    broken = tmp_path_factory.mktemp("broken") / "ckpt"
    shutil.copytree(trained, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    return broken


CASES = list(bad_cases(Path("."), Path("."), Path(".")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, files, trained, broken_ckpt, capsys):
    argv = bad_cases(files, trained, broken_ckpt)[case]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llm-train: error: ") and len(lines[0]) > 25
    assert "Traceback" not in err
    assert not (files / "out-never").exists()


def test_triton_backend_on_cpu_without_interpreter(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["--data", files / "pre.json", "--out", tmp_path / "x", "--backend", "triton"]
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "TRITON_INTERPRET=1" in err, err
    assert not (tmp_path / "x").exists()


def test_installed_script_bad_input(files, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [str(SCRIPT), "--data", str(files / "missing.txt"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("llm-train: error: ")
    assert "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_reports_loaded_and_skipped_data(files, tmp_path, capsys):
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(["one real sentence here.", "", "   ", "another real one."] * 5))
    argv = [a for a in TINY if a != "--quiet"]
    out, _ = run_ok(
        [*argv, "--data", mixed, "--out", tmp_path / "r", "--steps", "1", "--eval-every", "0"],
        capsys,
    )
    assert "data: 10 documents from 1 file (skipped: 10 empty text)" in out


def test_fresh_run_over_old_replaces_metrics_only_once_it_trains(files, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    old = (run / "metrics.jsonl").read_text()
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(["too short"]))
    assert cli.main([*map(str, TINY), "--data", str(tiny), "--out", str(run)]) == 2
    assert "too few" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == old  # a run that never started loses nothing
    argv = [*TINY, "--data", files / "pre.json", "--out", run, "--steps", "2", "--eval-every", "0"]
    run_ok(argv, capsys)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_honours_steps_and_refuses_what_it_cannot_change(files, tmp_path, capsys):
    out = tmp_path / "run"
    first = [*TINY, "--data", files / "pre.json", "--out", out, "--eval-every", "0"]
    run_ok([*first, "--steps", "3"], capsys)
    again = [*first, "--resume", out]
    # --steps below what is done, or a schedule field: one line naming the flag, nothing saved
    refused = [(["--steps", "2"], ["steps 2", "already at step 3"]),
               (["--steps", "5", "--lr", "0.5"], ["--lr 0.5", "keeps its lr"]),
               (["--d-model", "48"], ["--d-model 48", "keeps its model's shape"]),
               (["--vocab-size", "999"], ["--vocab-size 999", "keeps its tokenizer"])]  # fmt: skip
    for extra, words in refused:
        rc, _, err = run_cli(cli.main, capsys, *again, *extra)
        assert rc == 2 and err.count("\n") == 1 and all(w in err for w in words), err
        assert load_checkpoint(out).trainer_state["step"] == 3
    # a finished run extended: said in one line, and trained to the new end
    out_text, _ = run_ok([*again, "--steps", "5", "--device", "cpu"], capsys)
    assert "--steps 5: the run was planned for 3 steps and is at step 3" in out_text
    state = load_checkpoint(out).trainer_state
    assert state["step"] == 5 and state["total_steps"] == 5
