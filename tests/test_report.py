"""The report card: every finished llm-train run writes report.md (command, data, model
size, losses, plot, greedy samples); llm-eval --report appends its results to it."""

from __future__ import annotations

import json
import math
import re

import pytest
from chat_fixtures import TINY_TRAIN
from tritonlm.cli import evaluate as eval_cli
from tritonlm.cli import train as train_cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.eval.report import TEXT_PROMPTS, append_report, greedy_samples

TINY = TINY_TRAIN


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    texts = [f"Sentence number {i} is about the colour {c} — ünï." for i in range(30) for c in "ab"]
    (d / "pre.json").write_text(json.dumps(texts))
    out = d / "run"
    argv = [*TINY, "--data", str(d / "pre.json"), "--out", str(out), "--steps", "4",
            "--eval-every", "2"]  # fmt: skip
    assert train_cli.main(argv) == 0
    return out, argv, texts


def _row(card: str, first_cell: str) -> list[str]:
    line = next(x for x in card.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_training_writes_a_report_card(run):
    out, argv, texts = run
    card = (out / "report.md").read_text(encoding="utf-8")
    assert "llm-train " + " ".join(argv[:4]) in card  # the command as given
    ckpt = load_checkpoint(out)
    # data: every document, its UTF-8 bytes and <bos> text <eos> tokens
    n_tokens = sum(len(ckpt.tokenizer.encode(t)) + 2 for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert _row(card, "pretrain")[:4] == ["pretrain", f"{len(texts):,}", f"{n_bytes:,}",
                                          f"{n_tokens:,}"]  # fmt: skip
    assert f"{ckpt.model.num_parameters():,} parameters" in card
    # training: the final losses agree with the run's log; bpb is loss * tokens / bytes
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in log if "val_loss" in r][-1]
    cells = _row_training(card)
    assert cells[1] == "completed" and cells[2] == "4"
    assert float(cells[6]) == pytest.approx(log[-1]["loss"], abs=1e-4)
    assert float(cells[7]) == pytest.approx(log[-1]["loss"] * n_tokens / n_bytes / math.log(2),
                                            abs=1e-4)  # fmt: skip
    assert float(cells[8]) == pytest.approx(last_val["val_loss"], abs=1e-4)
    assert float(cells[9]) == pytest.approx(last_val["val_bpb"], abs=1e-4)
    assert (
        "![loss_pretrain.png](loss_pretrain.png)" in card and (out / "loss_pretrain.png").is_file()
    )
    # greedy samples: the same as generating again from the saved weights
    for prompt, text in greedy_samples(ckpt.model, ckpt.tokenizer, chat=False):
        assert f"- **{prompt}** → {' '.join(text.split()) or '(nothing)'}" in card
    assert len(re.findall(r"^- \*\*", card, flags=re.M)) == len(TEXT_PROMPTS)


def _row_training(card: str) -> list[str]:
    """The row of the training table (the one with a status column)."""
    lines = [x for x in card.splitlines() if x.startswith("| pretrain |")]
    return [c.strip() for c in lines[1].strip("|").split("|")]


def test_eval_appends_to_the_card(run, tmp_path, capsys):
    out, _, texts = run
    held = tmp_path / "held.txt"
    held.write_text(texts[0] + "\n" + texts[1])
    before = (out / "report.md").read_text(encoding="utf-8")
    assert eval_cli.main([str(out), "--data", str(held), "--report", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["text"]
    after = (out / "report.md").read_text(encoding="utf-8")
    assert after.startswith(before.rstrip("\n"))  # the training part is kept as it was
    section = after[len(before) :]
    assert "## Evaluation" in section and f"llm-eval {out}" in section
    assert (
        f"{result['bits_per_byte']:.4f}" in section
        and f"| 1 | {len(held.read_bytes())} |" in section
    )


def test_append_starts_a_card_where_there_is_none(tmp_path):
    path = append_report(tmp_path, "## Evaluation (x)\n\nbody")
    assert path.read_text() == "# Report card\n\n## Evaluation (x)\n\nbody\n"


def test_pretrain_and_sft_run_gets_both_rows_and_chat_samples(tmp_path):
    from tritonlm.engine.eval.report import CHAT_PROMPTS

    texts = [f"Fact {i}: the sky is blue and grass is green." for i in range(20)]
    (tmp_path / "pre.json").write_text(json.dumps(texts))
    chats = [f"User: What is {w}? Assistant: {w} is a word." for w in ("sun", "moon")] * 4
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(tmp_path / "pre.json"), "--chat-data",
            str(tmp_path / "chat.json"), "--out", str(out), "--pretrain-steps", "2",
            "--sft-steps", "2"]  # fmt: skip
    assert train_cli.main(argv) == 0
    card = (out / "report.md").read_text(encoding="utf-8")
    assert "| phase | documents / chats |" in card
    assert _row(card, "sft")[:2] == ["sft", "8"]
    assert _row(card, "pretrain")[:2] == ["pretrain", "20"]
    for prompt in CHAT_PROMPTS:  # an instruction-tuned model is asked as a chat
        assert f"- **{prompt}** →" in card
