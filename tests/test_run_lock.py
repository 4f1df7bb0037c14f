"""One writer per run directory and per token-cache entry (engine/run_lock.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from procs import running, saved_step, signal_and_wait, wait_until
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.run_lock import BusyError, exclusive, lock_file
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

SCRIPT = Path(sys.executable).parent / "llm-train"
TEXTS = [f"Note {i}: the {c} kite flew over hill {i % 9}." for i in range(80) for c in "uv"]
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--seq-len",
        "16", "--vocab-size", "300", "--batch-size", "4", "--threads", "1", "--quiet",
        "--device", "cpu", "--log-every", "1"]  # fmt: skip
HOLD = (
    "import sys, time\n"
    "from tritonlm.engine.run_lock import exclusive\n"
    "with exclusive(sys.argv[1], 'test'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def _holder(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    target = tmp_path / "run"
    p = _holder(target)
    try:
        with pytest.raises(BusyError, match=f"pid {p.pid}"):
            with exclusive(target, "--out"):
                pass
    finally:
        p.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the lock
        p.wait()
    assert lock_file(target).exists()  # left behind by the dead holder
    with exclusive(target, "--out"):
        assert lock_file(target).read_text().strip() == str(__import__("os").getpid())
    assert not lock_file(target).exists()  # released and removed


def test_waiting_lock_gets_it_when_the_holder_finishes(tmp_path):
    target, order = tmp_path / "entry", []

    def second():
        with exclusive(target, "x", wait=True):
            order.append("second")

    with exclusive(target, "x"):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert t.is_alive()  # still waiting while we hold it
        order.append("first")
    t.join(30)
    assert order == ["first", "second"]


def test_two_processes_tokenize_the_same_data_once(tmp_path):
    tok = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300))
    tok.save(tmp_path / "tok.json")
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS * 20))
    code = (
        "import json, sys\n"
        "from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer\n"
        "from tritonlm.engine.data.token_cache import build_pretrain_cache\n"
        "tok = BpeTokenizer.load(sys.argv[1])\n"
        "texts = json.load(open(sys.argv[2]))\n"
        "print(build_pretrain_cache(texts, tok, sys.argv[3]).path)\n"
    )
    args = [str(tmp_path / "tok.json"), str(tmp_path / "texts.json"), str(tmp_path / "cache")]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o.strip() for o, _ in outs}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(outs[0][0].strip()).name]
    again = tc.open_cache(outs[0][0].strip())
    assert again.n_docs == len(TEXTS) * 20


def test_second_llm_train_on_the_same_out_is_refused_then_takes_over(tmp_path):
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(TEXTS))
    out = tmp_path / "run"
    argv = [str(SCRIPT), *TINY, "--data", str(data), "--out", str(out), "--steps", "100000",
            "--eval-every", "0", "--save-every", "2"]  # fmt: skip
    with running(argv) as first:
        wait_until(first, lambda: saved_step(out) >= 2)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run was not disturbed
        first.send_signal(signal.SIGKILL)  # dies holding the lock, maybe mid-save
        first.wait()
    step = load_checkpoint(out).trainer_state["step"]
    # a new run takes the dead holder's lock over; stop it once it has saved a later step
    with running([*argv, "--resume", str(out)]) as r:
        wait_until(r, lambda: saved_step(out) > step, poll=0.2)
        err = signal_and_wait(r, signal.SIGINT)
    assert r.returncode == 130, err
