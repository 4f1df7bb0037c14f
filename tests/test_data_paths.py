"""Data paths are untrusted: special files, OS errors, duplicates and unreadable folders.

Every bad path is one `DataError` naming it (never a hang, never a traceback); a file
reached twice is read once and counted; an unreadable subfolder is counted, not hidden.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tritonlm.engine.data import data_files
from tritonlm.engine.data.data_files import DataError
from tritonlm.engine.data.records import load_chats, load_texts
from tritonlm.engine.errors import os_reason

CHAT = "User: hi Assistant: hello"


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------- special files

# The load runs in a child process: if a FIFO were ever opened it would block forever, and
# the timeout turns that into a failure instead of a hung test run.
CHILD = """
import json, sys
from tritonlm.engine.data.records import DataError, load_chats, load_texts
load = load_chats if sys.argv[1] == "chats" else load_texts
try:
    load(json.loads(sys.argv[2]), option="--data")
except DataError as e:
    print(str(e)); sys.exit(3)
print("loaded"); sys.exit(0)
"""


def load_in_child(kind: str, paths: list) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, json.dumps([str(p) for p in paths])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout.strip()


def make_fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_socket(path: Path, keep: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    keep.append(s)
    return path


def symlink(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def alone(path: Path) -> tuple[list, Path]:
    return [path], path


def inside(folder: Path, path: Path) -> tuple[list, Path]:
    return [folder], path


# name -> (loader, build(tmp, sockets) -> (paths to load, the path the error names), word)
SPECIAL = {
    "fifo.json": ("texts", lambda t, k: alone(make_fifo(t / "f.json")), "a FIFO"),
    "fifo.jsonl": ("texts", lambda t, k: alone(make_fifo(t / "f.jsonl")), "a FIFO"),
    "fifo.txt": ("texts", lambda t, k: alone(make_fifo(t / "f.txt")), "a FIFO"),
    "fifo.csv": ("texts", lambda t, k: alone(make_fifo(t / "f.csv")), "a FIFO"),
    "fifo-no-ext": ("texts", lambda t, k: alone(make_fifo(t / "f")), "a FIFO"),
    "fifo-chats": ("chats", lambda t, k: alone(make_fifo(t / "c.jsonl")), "a FIFO"),
    "fifo-in-folder": ("texts", lambda t, k: inside(t, make_fifo(t / "b.json")), "a FIFO"),
    "fifo-deep": ("texts", lambda t, k: inside(t, make_fifo(t / "x" / "y" / "p.txt")), "FIFO"),
    "fifo-other-ext": ("texts", lambda t, k: inside(t, make_fifo(t / "notes.md")), "FIFO"),
    "fifo-chats-in-folder": ("chats", lambda t, k: inside(t, make_fifo(t / "c.json")), "FIFO"),
    "link-to-fifo": (
        "texts",
        lambda t, k: alone(symlink(t / "l.json", make_fifo(t / "f"))),
        "FIFO",
    ),
    "link-to-fifo-in-folder": (
        "texts",
        lambda t, k: inside(t / "d", symlink(t / "d" / "l.json", make_fifo(t / "f"))),
        "FIFO",
    ),
    "socket": ("texts", lambda t, k: alone(make_socket(t / "s.json", k)), "a socket"),
    "socket-in-folder": ("texts", lambda t, k: inside(t, make_socket(t / "s.txt", k)), "a socket"),
    "dev-zero": ("texts", lambda t, k: alone(Path("/dev/zero")), "a character device"),
    "dev-null": ("texts", lambda t, k: alone(Path("/dev/null")), "a character device"),
    "dev-urandom": ("chats", lambda t, k: alone(Path("/dev/urandom")), "a character device"),
    "link-to-dev-zero": (
        "texts",
        lambda t, k: alone(symlink(t / "z.txt", Path("/dev/zero"))),
        "a character device",
    ),
    "dev-zero-in-folder": (
        "texts",
        lambda t, k: inside(t, symlink(t / "z.txt", Path("/dev/zero"))),
        "a character device",
    ),
}


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_files_are_refused_without_opening(tmp_path, name):
    kind, build, word = SPECIAL[name]
    write(tmp_path / "a.json", json.dumps([CHAT]))  # a good file beside it changes nothing
    if "dev" in name and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    sockets: list = []
    try:
        paths, bad = build(tmp_path, sockets)
        rc, out = load_in_child(kind, paths)
    finally:
        for s in sockets:
            s.close()
    assert rc == 3, out
    assert out.startswith(f"--data {bad}: is ") and word in out and "not a regular file" in out
    assert len(out.splitlines()) == 1


def test_fifo_check_survives_a_swap_after_the_walk(tmp_path):
    """A regular file replaced by a FIFO between the check and the open is still refused."""
    fifo = make_fifo(tmp_path / "late.json")
    with pytest.raises(DataError, match="a FIFO"):
        data_files.open_regular(fifo)  # O_NONBLOCK: returns at once, then fstat refuses


# ----------------------------------------------------------------------------- OS errors


def _deny(monkeypatch, target: Path, call: str):
    """Make os.open or os.scandir fail with EACCES for `target` (root ignores chmod)."""
    real = getattr(os, call)

    def fake(path, *args, **kw):
        if Path(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(data_files.os, call, fake)


def _loop(t: Path) -> Path:
    symlink(t / "b.json", t / "a.json")
    return symlink(t / "a.json", t / "b.json")


# name -> (build(tmp, monkeypatch) -> bad path, expected reason after "PATH: ")
OS_ERRORS = {
    "missing": (lambda t, m: t / "nope.json", "no such file or folder"),
    "missing-parent": (lambda t, m: t / "no" / "such" / "x.json", "no such file or folder"),
    "parent-is-a-file": (lambda t, m: write(t / "f.json", "[]") / "x.json", "not a folder"),
    "name-too-long": (lambda t, m: t / ("n" * 300 + ".json"), "file name too long"),
    "path-too-long": (lambda t, m: t / ("d/" * 3000 + "x.json"), "file name too long"),
    "broken-link": (lambda t, m: symlink(t / "l.json", t / "gone.json"), "broken symbolic link"),
    "link-loop": (lambda t, m: _loop(t), "symlink loop"),
    "file-denied": (lambda t, m: _denied(t, m, "open", write(t / "s.json", "[]")), "denied"),
    "folder-denied": (lambda t, m: _denied(t, m, "scandir", t / "sub"), "permission denied"),
    "broken-link-in-folder": (
        lambda t, m: (t, symlink(t / "d" / "l.txt", t / "gone"))[1],
        "broken symbolic link",
    ),
}


def _denied(t: Path, m, call: str, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True) if call == "scandir" else None
    write(path / "a.txt", "x") if call == "scandir" else None
    _deny(m, path, call)
    return path


@pytest.mark.parametrize("loader", [load_texts, load_chats])
@pytest.mark.parametrize("name", sorted(OS_ERRORS))
def test_os_errors_name_the_option_path_and_reason(tmp_path, monkeypatch, name, loader):
    build, reason = OS_ERRORS[name]
    bad = build(tmp_path, monkeypatch)
    given = tmp_path / "d" if name.endswith("in-folder") else bad
    msg = error_of(loader, [given], option="--data")
    assert msg.startswith(f"--data {bad}: ") and reason in msg, msg
    assert "Errno" not in msg and "\n" not in msg


@pytest.mark.parametrize(
    "raw, needle",
    [("", "'': empty path"), ("a\0b.json", "NUL character")],
)
def test_impossible_paths(raw, needle):
    msg = error_of(load_texts, [raw], option="--data")
    assert msg.startswith("--data ") and needle in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_real_unreadable_file(tmp_path):
    f = write(tmp_path / "secret.json", '["x"]')
    f.chmod(0)
    try:
        assert error_of(load_texts, [f]) == f"{f}: permission denied"
    finally:
        f.chmod(0o600)


def test_os_reason_has_no_errno_noise():
    assert os_reason(PermissionError(13, "Permission denied")) == "permission denied"
    assert os_reason(OSError(5, "Input/output error")) == "input/output error"
    assert os_reason(OSError(999, "Strange Thing")) == "strange Thing"


# ----------------------------------------------------------------------------- duplicates


def corpus(t: Path) -> Path:
    write(t / "c" / "a.json", json.dumps(["A1", "A2"]))
    write(t / "c" / "sub" / "b.txt", "B")
    return t / "c"


# name -> (paths to give, relative to tmp, after corpus() and extra links; duplicates)
DUPLICATES = {
    "same-file-twice": (["c/a.json", "c/a.json"], 1),
    "same-file-three-times": (["c/a.json", "c/a.json", "c/a.json"], 2),
    "file-then-folder": (["c/a.json", "c"], 1),
    "folder-then-file": (["c", "c/a.json"], 1),
    "folder-twice": (["c", "c"], 1),
    "folder-then-subfolder": (["c", "c/sub"], 1),
    "subfolder-then-folder": (["c/sub", "c"], 1),
    "file-then-link": (["c/a.json", "link.json"], 1),
    "link-then-file": (["link.json", "c/a.json"], 1),
    "other-spelling": (["c/a.json", "c/sub/../a.json", "./c/./a.json"], 2),
    "hard-link": (["c/a.json", "hard.json"], 1),
    "folder-link": (["c", "clink"], 1),
    "link-in-folder": (["c"], 1),
    "link-in-folder-and-given": (["c", "c/sub/again.json"], 2),
    "loop-in-folder": (["c"], 1),
}


@pytest.mark.parametrize("loader", ["texts", "chats"])
@pytest.mark.parametrize("name", sorted(DUPLICATES))
def test_a_file_reached_twice_is_read_once_and_counted(tmp_path, monkeypatch, name, loader):
    rel, dups = DUPLICATES[name]
    monkeypatch.chdir(tmp_path)
    c = corpus(tmp_path)
    if loader == "chats":  # the same tree, holding chats
        (c / "a.json").write_text(json.dumps([CHAT, CHAT + " User: more Assistant: ok"]))
        (c / "sub" / "b.txt").unlink()
        write(
            c / "sub" / "b.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "B"}]})
        )
    load = load_chats if loader == "chats" else load_texts
    once = load([c] if "folder" in name else ["c/a.json"])  # before any link exists
    (tmp_path / "link.json").symlink_to(c / "a.json")
    os.link(c / "a.json", tmp_path / "hard.json")
    (tmp_path / "clink").symlink_to(c)
    (c / "sub" / "again.json").symlink_to(c / "a.json") if "link-in" in name else None
    (c / "sub" / "up").symlink_to(c) if name == "loop-in-folder" else None
    result = load(rel)
    assert result.skipped == {"duplicate path": dups}
    assert sorted(map(str, result.items)) == sorted(map(str, once.items))  # order: as given
    assert len(result.sources) == len(once.sources) == len(set(result.sources))
    assert f"{dups} duplicate path [" in result.summary("documents")


# ----------------------------------------------------------------------------- unreadable folders


def test_unreadable_subfolder_is_counted_simulated(tmp_path, monkeypatch):
    write(tmp_path / "a.txt", "A")
    write(tmp_path / "locked" / "b.txt", "B")
    write(tmp_path / "z" / "c.txt", "C")
    _deny(monkeypatch, tmp_path / "locked", "scandir")
    result = load_texts([tmp_path])
    assert result.items == ["A", "C"] and result.skipped == {"unreadable folder": 1}
    assert result.summary("documents") == (
        f"2 documents from 2 files (skipped: 1 unreadable folder [{tmp_path / 'locked'}])"
    )


def test_unreadable_subfolder_only_is_no_data(tmp_path, monkeypatch):
    write(tmp_path / "locked" / "b.txt", "B")
    _deny(monkeypatch, tmp_path / "locked", "scandir")
    msg = error_of(load_texts, [tmp_path])
    assert "no usable texts" in msg and "1 unreadable folder" in msg


def test_unreadable_subfolder_is_counted_for_real(tmp_path):
    write(tmp_path / "a.txt", "A")
    locked = tmp_path / "locked"
    write(locked / "b.txt", "B")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not lock")
        result = load_texts([tmp_path])
    finally:
        locked.chmod(0o700)
    assert result.items == ["A"] and result.skipped == {"unreadable folder": 1}


def test_option_prefix_on_every_error(tmp_path):
    f = write(tmp_path / "bad.json", "[1]")
    assert error_of(load_texts, [f], option="--data").startswith(f"--data {f}:1: list item")
    assert error_of(load_chats, [f], option="--chat-data").startswith(f"--chat-data {f}:1:")
    assert error_of(load_texts, [f]).startswith(f"{f}:1:")  # no option: the path comes first
