"""Bad data through llm-train: exactly one line on stderr, exit 2, the path named, no run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tritonlm.cli import train as cli

SCRIPT = Path(sys.executable).parent / "llm-train"
DEEP = "[" * 100_000 + "]" * 100_000

# name -> (file name, content or None for a folder built by the test, option)
BAD = {
    "deep-json": ("deep.json", "[" + DEEP + "]", "--data"),
    "deep-jsonl": ("deep.jsonl", DEEP + "\n", "--data"),
    "deep-chat-jsonl": ("deep.jsonl", '{"messages": ' + DEEP + "}\n", "--chat-data"),
    "deep-object": ("o.json", '["x", ' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "]", "--data"),
    "latin1": ("l.txt", b"caf\xe9", "--data"),
    "nul": ("n.csv", b"a,\x00b\n", "--data"),
    "utf16": ("u.json", '["a"]'.encode("utf-16"), "--data"),
    "not-a-list": ("t.json", '{"text": "a"}', "--data"),
    "null-item": ("i.json", '["a", null]', "--chat-data"),
    "huge-int": ("h.json", "[" + "7" * 5000 + "]", "--data"),
    "surrogate": ("s.json", '["\\ud800"]', "--data"),
    "extra-data": ("e.json", '["a"] ["b"]', "--data"),
    "empty-path": ("", None, "--data"),
    "missing": ("missing.json", None, "--data"),
    "dev-zero": ("/dev/zero", None, "--data"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_data_is_one_line_exit_2(tmp_path, capsys, name):
    fname, content, option = BAD[name]
    path = tmp_path / fname if fname and not fname.startswith("/") else Path(fname)
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    arg = "" if not fname else str(path)
    code = cli.main([option, arg, "--out", str(tmp_path / "run"), "--quiet"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("llm-train: error: ") and "Traceback" not in err
    assert arg in lines[0] and not (tmp_path / "run").exists()


def test_fifo_through_the_installed_script(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "ok.json").write_text(json.dumps(["fine"]))
    proc = subprocess.run(
        [str(SCRIPT), "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'pipe.json'}: is a FIFO" in proc.stderr
