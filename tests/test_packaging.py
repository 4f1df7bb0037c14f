"""The wheel carries every module: a subpackage missing from pyproject's package list would
install without it and fail only on a user's machine."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "tritonlm/kernels", "engine": "tritonlm/engine", "cli": "tritonlm/cli"}


def test_the_wheel_holds_every_module(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("tritonlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{prefix}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder, prefix in PACKAGES.items()
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert len(expected) > 80  # the tree was found at all
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "tritonlm/cli/static/chat.html" in names  # llm-serve's page is package data
    assert "tritonlm/kernels/kernel_configs.json" in names  # the launchers read it
