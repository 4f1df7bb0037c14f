"""Task files: the four formats are detected and turned into the harness's prompts; a
malformed file is one line naming the file and line, from the engine and from llm-eval."""

import json

import pytest
from chat_fixtures import trained_checkpoint
from tritonlm.cli.evaluate import main
from tritonlm.engine.eval.task_formats import TaskError, load_task

HELLASWAG = {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "activity_label": "Roof",
             "endings": ["is using wrap [title] to wrap a pair of skis.",
                         "starts pulling up roofing."], "label": "1"}  # fmt: skip
ARC = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"],
       "label": ["A", "B", "C"]}, "answerKey": "B"}  # fmt: skip
MMLU = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "22"], "answer": "B",
        "subject": "elementary_mathematics"}  # fmt: skip
PLAIN = {"context": "The sky is", "choices": ["blue", "green"], "answer": 0}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_hellaswag_is_cleaned_as_the_harness_does(tmp_path):
    fmt, [item] = load_task(_write(tmp_path / "h.jsonl", [HELLASWAG]))
    assert fmt == "hellaswag"
    assert item.context == "Roof: A man is sitting on a roof. He"
    assert item.choices == ("is using wrap. to wrap a pair of skis.", "starts pulling up roofing.")
    assert item.gold == 1 and item.line == 1
    # only "ctx" (the dataset's joined field) and an int label
    plain = {"ctx": "A man [step] is here", "endings": ["a", "b"], "label": 0}
    _, [item] = load_task(_write(tmp_path / "h2.jsonl", [plain]))
    assert item.context == "A man is here" and item.gold == 0


def test_arc_mmlu_and_plain_are_detected(tmp_path):
    fmt, [item] = load_task(_write(tmp_path / "a.jsonl", [ARC]))
    assert fmt == "arc" and item.context == "Question: Which is a gas?\nAnswer:"
    assert item.choices == ("ice", "steam", "rock") and item.gold == 1
    fmt, (item, other) = load_task(_write(tmp_path / "m.jsonl", [MMLU, {**MMLU, "answer": 3}]))
    assert fmt == "mmlu" and other.gold == 3
    assert item.context == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert item.choices == ("A", "B", "C", "D") and item.gold == 1
    assert item.description.endswith("about elementary mathematics.\n\n")
    fmt, items = load_task(_write(tmp_path / "p.jsonl", [PLAIN, "", {**PLAIN, "answer": "green"}]))
    assert fmt == "plain" and [i.gold for i in items] == [0, 1] and items[1].line == 3


def test_format_can_be_forced(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{**PLAIN, "question": "q?", "answer": 1}])
    assert load_task(path)[0] == "plain"
    fmt, [item] = load_task(path, "mmlu")
    assert fmt == "mmlu" and item.choices == ("A", "B")


@pytest.mark.parametrize("lines,where,words", [
    ([PLAIN, PLAIN, "{not json"], ":3:", "not valid JSON"),
    ([PLAIN, "[1, 2]"], ":2:", "expected a JSON object"),
    ([{"foo": 1}], ":1:", "cannot tell the task format"),
    ([PLAIN, {**PLAIN, "answer": 5}], ":2:", "index in 0..1"),
    ([HELLASWAG, {**HELLASWAG, "endings": "abc"}], ":2:", "endings"),
    ([ARC, {**ARC, "answerKey": "Z"}], ":2:", "answerKey"),
    ([PLAIN, {**PLAIN, "choices": ["a", " "]}], ":2:", "empty"),
    ([PLAIN, HELLASWAG], ":2:", "plain item"),  # a second format in one file
    ([], "", "no task items"),
])  # fmt: skip
def test_malformed_task_files_name_file_and_line(tmp_path, lines, where, words):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}{where}") and words in str(e.value)


def test_cli_reports_a_malformed_file_in_one_line(tmp_path, ckpt, capsys):
    path = _write(tmp_path / "bad.jsonl", [PLAIN, "{oops"])
    assert main([str(ckpt), "--task", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llm-eval: error: {path}:2: not valid JSON")
    assert main([str(ckpt)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main([str(ckpt), "--task", str(_write(tmp_path / "ok.jsonl", [PLAIN])),
                 "--fewshot", "3"]) == 2  # fmt: skip
    assert "fewshot 3" in capsys.readouterr().err
    ok, txt = str(tmp_path / "ok.jsonl"), tmp_path / "a.txt"
    txt.write_text("hi hello there")
    for argv, words in [([str(tmp_path / "nockpt"), "--task", ok], "nockpt"),
                        ([str(ckpt), "--data", str(txt), "--context", "65"], "--context 65"),
                        ([str(ckpt), "--task", ok, "--report", str(tmp_path / "no")], "--report"),
                        ([str(ckpt), "--task", ok, "--limit", "0"], "--limit")]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llm-eval: error:") and words in err


def test_cli_json_and_report(tmp_path, ckpt, capsys):
    task = _write(tmp_path / "t.jsonl", [PLAIN, {**PLAIN, "answer": 1}, ARC])
    text = tmp_path / "held.txt"
    text.write_text("hi hello there, friend. bye goodbye!")
    run = tmp_path / "run"
    run.mkdir()
    argv = [str(ckpt), "--data", str(text), "--task", str(task), "--format", "plain"]
    assert main(argv + ["--json"]) == 2  # the ARC line is not plain
    assert ":3: plain item" in capsys.readouterr().err
    task = _write(tmp_path / "t.jsonl", [PLAIN, {**PLAIN, "answer": 1}])
    assert main(argv + ["--json", "--report", str(run), "--limit", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"]["documents"] == 1 and out["text"]["bytes"] == len(text.read_bytes())
    assert out["tasks"][0]["items"] == 1 and out["tasks"][0]["format"] == "plain"
    card = (run / "report.md").read_text()
    assert "## Evaluation" in card and "| t.jsonl | plain | 1 | 0 |" in card
    assert f"{out['text']['bits_per_byte']:.4f}" in card
    assert main(argv + ["--report", str(run)]) == 0  # a second run appends
    assert (run / "report.md").read_text().count("## Evaluation") == 2
