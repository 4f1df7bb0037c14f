"""The engine names config fields, the command lines name flags (issue 20).

An engine message that advises a setting writes the field in backticks ("try a lower `lr`")
or starts with it (``field=``); `cli/` turns both into the flag the user types. These tests
hold the engine to that and check that every field it names is a real flag somewhere.
"""

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

from tritonlm.cli import chat, evaluate, export, import_hf, serve, train_flags
from tritonlm.engine.errors import EngineError
from tritonlm.engine.fields import FLAG_NAMES, flag_of, with_flag

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
MARKED = re.compile(r"`([a-z][a-z0-9_]*)`")


def _engine_strings():
    """(path, line, text) of every string constant in engine/ that is not a docstring."""
    for path in sorted((ROOT / "engine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0] if node.body else None
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docs.add(id(first.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docs:
                    yield path.relative_to(ROOT), node.lineno, node.value


def _field_keywords():
    """Every ``field="name"`` given to an error in engine/."""
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "field" and isinstance(kw.value, ast.Constant):
                        yield path.relative_to(ROOT), kw.value.value


def _all_flags() -> set[str]:
    flags = set()
    for build in (train_flags.build_parser, chat.build_parser, evaluate.build_parser,
                  serve.build_parser, export.build_parser, import_hf.build_parser):  # fmt: skip
        for action in build()._actions:
            if not isinstance(action, argparse._HelpAction):
                flags.update(action.option_strings)
    return flags


def test_no_engine_string_names_a_command_line_flag():
    found = [
        f"{path}:{line}: {text[:70]!r}"
        for path, line, text in _engine_strings()
        if FLAG.search(text) and text not in FLAG_NAMES.values()  # the map itself
    ]
    assert not found, "engine text naming flags (write the field in backticks):\n" + "\n".join(
        found
    )


def test_every_field_the_engine_names_is_a_flag():
    flags = _all_flags()
    named = {(str(p), m) for p, _, text in _engine_strings() for m in MARKED.findall(text)}
    named |= {(str(p), f) for p, f in _field_keywords()}
    assert len(named) >= 15  # the sweep saw the advice lines at all
    missing = sorted(f"{p}: `{name}` -> {flag_of(name)}" for p, name in named
                     if flag_of(name) not in flags)  # fmt: skip
    assert not missing, "fields named by the engine that no command has:\n" + "\n".join(missing)


def test_with_flag_rewrites_the_leading_field_and_every_marked_one():
    msg = "out /x: exists; lower `batch_size` or `seq_len`, or use `grad_accum`"
    assert with_flag(msg, "out") == (
        "--out /x: exists; lower --batch-size or --seq-len, or use --grad-accum"
    )
    assert with_flag("steps 3 (no mark)") == "steps 3 (no mark)"  # only marked names change
    assert with_flag("`max_seq_len` too small") == "--seq-len too small"  # the CLI's own name
    assert str(EngineError("try a lower `lr`")) == "try a lower `lr`"  # library users see fields


def test_an_engine_hint_reaches_the_terminal_as_flags(tmp_path):
    """A real command: too few pretraining windows for a validation split. The engine says
    `seq_len`; llm-train prints --seq-len, in one line, exit 2."""
    data = tmp_path / "tiny.txt"
    data.write_text("a few words only\n")
    cmd = [sys.executable, "-m", "tritonlm.cli.train", "--data", str(data), "--out",
           str(tmp_path / "run"), "--preset", "seed", "--vocab-size", "300", "--seq-len", "64",
           "--steps", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "--seq-len" in err and "`" not in err, err
