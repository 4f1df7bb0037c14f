"""Every list-valued flag of every command collects all its occurrences: `--data a --data b`
is `--data a b` (argparse alone keeps only the last one, which silently drops data)."""

import argparse
import json
import types

import pytest
from chat_fixtures import trained_checkpoint
from tritonlm.cli import chat, evaluate, export, import_hf, serve, train_flags
from tritonlm.cli.train_inputs import load_inputs

# command -> (parser, positional arguments it needs)
COMMANDS = {
    "llm-train": (train_flags.build_parser, []),
    "llm-eval": (evaluate.build_parser, ["CK"]),
    "llm-chat": (chat.build_parser, ["CK"]),
    "llm-serve": (serve.build_parser, ["CK"]),
    "llm-export": (export.build_parser, ["CK", "OUT"]),
    "llm-import": (import_hf.build_parser, ["HF", "OUT"]),
}
# The list flags known today: the sweep below must find at least these.
KNOWN = {("llm-train", "--data"), ("llm-train", "--chat-data"), ("llm-train", "--text-ext"),
         ("llm-eval", "--data"), ("llm-eval", "--task"), ("llm-chat", "--stop")}  # fmt: skip


def _list_flags():
    for name, (build, positional) in COMMANDS.items():
        for action in build()._actions:
            many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
            if many and action.option_strings:
                yield name, action.option_strings[-1], build, positional, action.nargs


FLAGS = list(_list_flags())


def test_the_sweep_finds_every_known_list_flag():
    assert KNOWN <= {(name, flag) for name, flag, *_ in FLAGS}


@pytest.mark.parametrize("name, flag, build, positional, nargs", FLAGS,
                         ids=[f"{n} {f}" for n, f, *_ in FLAGS])  # fmt: skip
def test_repeated_equals_space_separated(name, flag, build, positional, nargs):
    dest = next(a.dest for a in build()._actions if flag in a.option_strings)
    repeated = vars(build().parse_args([*positional, flag, "a.x", flag, "b.x", flag, "c.x"]))
    assert list(repeated[dest]) == ["a.x", "b.x", "c.x"], (name, flag)
    if nargs in ("+", "*"):
        spaced = vars(build().parse_args([*positional, flag, "a.x", "b.x", "c.x"]))
        mixed = vars(build().parse_args([*positional, flag, "a.x", "b.x", flag, "c.x"]))
        assert list(spaced[dest]) == list(mixed[dest]) == list(repeated[dest])


def test_text_ext_repeated_replaces_the_default_once():
    args = train_flags.build_parser().parse_args(["--text-ext", ".md,.py", "--text-ext", ".rs"])
    assert list(args.text_ext) == [".md", ".py", ".rs"]
    assert list(train_flags.build_parser().parse_args(["--text-ext", ""]).text_ext) == []


def test_train_reads_every_repeated_data_path(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.md").write_text("# c\n")
    runs = {}
    for form in (["--data", "a.txt", "--data", "more", "--data", "b.txt"],
                 ["--data", "a.txt", "more", "b.txt"]):  # fmt: skip
        argv = [a if a.startswith("--") else str(tmp_path / a) for a in form]
        args = train_flags.build_parser().parse_args(
            [*argv, "--out", str(tmp_path / "run"), "--quiet"]
        )
        corpus, _ = load_inputs(args, types.SimpleNamespace(is_main=True))
        runs[" ".join(form)] = sorted(p.name for p in corpus.files)
    assert list(runs.values()) == [["a.txt", "b.txt", "c.md"]] * 2


def test_eval_scores_every_repeated_task(tmp_path_factory, tmp_path, capsys):
    ckpt = trained_checkpoint(tmp_path_factory)
    item = {"context": "hi", "choices": ["hello", "bye"], "answer": 0}
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps(item) + "\n")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    results = []
    for form in (["--task", a, "--task", b], ["--task", a, b]):
        assert evaluate.main([str(ckpt), *form, "--json", "--quiet"]) == 0
        results.append([t["file"] for t in json.loads(capsys.readouterr().out)["tasks"]])
    assert results == [[a, b], [a, b]]


def test_eval_task_folder_says_folder(tmp_path_factory, tmp_path, capsys):
    ckpt = trained_checkpoint(tmp_path_factory)
    assert evaluate.main([str(ckpt), "--task", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder; give a file" in err and "special" not in err
