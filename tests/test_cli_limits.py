"""llm-train never hangs, crashes or stalls on odd but well-formed requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import running, signal_and_wait, wait_until
from tritonlm.cli import train as cli

SCRIPT = Path(sys.executable).parent / "llm-train"
TEXTS = [f"Row {i}: a {c} fox ran past post {i % 11}." for i in range(60) for c in "mn"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "texts.json"
    p.write_text(json.dumps(TEXTS))
    return p


HUGE = {
    "threads": ["--threads", "100000"],
    "batch size": ["--batch-size", "1000000000"],
    "seq len": ["--seq-len", "200000000", "--vocab-size", "300"],
    "width": ["--d-model", "65536", "--n-heads", "64", "--n-layers", "64", "--vocab-size", "300"],
    "layers": ["--n-layers", "100000", "--vocab-size", "300"],
    "ffn": ["--d-ff", "1000000000", "--vocab-size", "300"],
    "accum x batch": ["--batch-size", "300000000", "--grad-accum", "1000"],
}


@pytest.mark.parametrize("case", HUGE)
def test_impossible_sizes_fail_fast_in_one_line(case, data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["--data", str(data), "--out", str(out), "--device", "cpu", "--quiet",
                     *HUGE[case]])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("llm-train: error: ")
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_tokenizer_that_is_not_a_regular_file_is_refused(kind, data, tmp_path):
    path = {"fifo": tmp_path / "tok.fifo", "directory": tmp_path, "device": Path("/dev/zero")}
    if kind == "fifo":
        os.mkfifo(path[kind])
    r = subprocess.run(
        [
            str(SCRIPT),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(path[kind]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip  (a FIFO read would block until the timeout)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "not a regular file" in r.stderr


def _mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


MOMENTS = {  # what to wait for before the Ctrl-C: a point in the run, not a delay
    "torch loading": lambda p, out: _mapped(p.pid, "libtorch_cpu"),
    "tokenizing": lambda p, out: (out.parent / ".cache").exists(),
    "training": lambda p, out: (out / "metrics.jsonl").exists(),
}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_at_any_moment_stops_without_a_traceback(moment, tmp_path):
    """From torch's import to training: the run stops with exit 130 and never prints a
    traceback (cli/entry.py takes the signals over before anything heavy is imported)."""
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(TEXTS * 30))
    out = tmp_path / "run"
    argv = [str(SCRIPT), "--data", str(data), "--out", str(out), "--steps", "100000",
            "--eval-every", "0", "--vocab-size", "300", "--quiet", "--threads", "1",
            "--log-every", "1"]  # fmt: skip
    with running(argv) as p:
        wait_until(p, lambda: MOMENTS[moment](p, out), poll=0.002)
        err = signal_and_wait(p, signal.SIGINT)
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("form", ["array", "object", "inside"])
def test_deeply_nested_tokenizer_file_is_one_line(form, data, tmp_path, capsys):
    deep = {"array": "[" * 50000 + "]" * 50000, "object": '{"a":' * 50000 + "1" + "}" * 50000,
            "inside": '{"merges": ' + "[" * 50000 + "]" * 50000 + "}"}[form]  # fmt: skip
    tok = tmp_path / "tok.json"
    tok.write_text(deep)
    code = cli.main(["--data", str(data), "--out", str(tmp_path / "o"), "--tokenizer",
                     str(tok), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
