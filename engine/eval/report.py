"""The report card: ``report.md`` in a run directory, written by training, extended by eval.

``llm-train`` writes it at the end of a run that finished (completed or early-stopped):
the command, the data, the model's size, time and throughput, the final losses and bits
per byte, the loss plots it drew, and greedy samples from fixed prompts. ``llm-eval
--report DIR`` appends one section per evaluation, so the card keeps a run's history.

Bits per byte here: training's validation figure is the validation loss times the
validation split's tokens over its bytes (the ``<|eos|>`` of each document counted, as the
loss counts it); the train figure applies the whole corpus's tokens-per-byte ratio to
the last train loss. ``llm-eval --data`` gives the exact figure for any held-out text.
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write
from ..inference.chat_prompt import encode_raw_prompt

REPORT_FILE = "report.md"
TEXT_PROMPTS = ("The", "Once upon a time", "A language model is")
CHAT_PROMPTS = ("What is a token?", "Tell me a short story.")
SAMPLE_TOKENS = 40


def _fmt(value, digits: int = 4) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: list[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |"
                    for r in rows]  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ----------------------------------------------------------------------------- training


def greedy_samples(model, tokenizer, chat: bool, max_new_tokens: int = SAMPLE_TOKENS):
    """[(prompt, completion)] from the fixed prompts: plain text after ``<|bos|>`` for a
    pretrained model, one user turn for an instruction-tuned one. Greedy, so the same
    weights always give the same samples."""
    from ..inference.generate import generate
    from ..inference.sampling import SamplingConfig

    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    out = []
    for prompt in CHAT_PROMPTS if chat else TEXT_PROMPTS:
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            ids = tokenizer.render_chat(msgs, add_generation_prompt=True)[0]
        else:
            ids = encode_raw_prompt(tokenizer, prompt)
        out.append((prompt, generate(model, tokenizer, ids, config).text))
    return out


def phase_summary(phase: str, cache, result) -> dict:
    """One row of the card from a phase's token cache and TrainResult."""
    history = result.history or []
    val = next((r for r in reversed(history) if r.get("val_loss") is not None), {})
    rates = [r["tokens_per_s"] for r in history if r.get("tokens_per_s")]
    train_bpb = None
    if phase == "pretrain" and result.loss is not None and cache.n_bytes:
        train_bpb = result.loss * cache.n_tokens / (math.log(2) * cache.n_bytes)
    return {
        "phase": phase, "status": result.status, "steps": result.step,
        "documents": cache.n_docs, "bytes": cache.n_bytes, "tokens": cache.n_tokens,
        "seconds": result.seconds, "tokens_seen": result.tokens,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "train_loss": result.loss, "train_bpb": train_bpb,
        "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"),
    }  # fmt: skip


def train_report(argv: Sequence[str], phases: list[dict], model, samples, plots) -> str:
    """The Markdown of a training card (see :func:`write_train_report`)."""
    cfg = model.config
    lines = ["# Report card", "", f"Written {_now()} by `llm-train`.", "", "```",
             _command(argv), "```", "", "## Data", ""]  # fmt: skip
    kinds = {"documents" if p["phase"] == "pretrain" else "chats" for p in phases}
    data = " / ".join(sorted(kinds, reverse=True))  # "documents / chats" for both phases
    lines += _table(
        ["phase", data, "bytes (UTF-8)", "tokens"],
        [[p["phase"], p["documents"], p["bytes"], p["tokens"]] for p in phases],
    )
    total, body = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    layers = f"{cfg.n_layers} layer{'s' if cfg.n_layers != 1 else ''}"
    lines += ["", "## Model", "",
              f"{total:,} parameters ({body:,} without the embedding): d_model {cfg.d_model}, "
              f"{layers}, {cfg.n_heads} heads, d_ff {cfg.d_ff}, vocabulary {cfg.vocab_size}, "
              f"context {cfg.max_seq_len}.", "", "## Training", ""]  # fmt: skip
    rows = [
        [
            p["phase"],
            p["status"],
            p["steps"],
            f"{p['seconds']:.1f}",
            p["tokens_seen"],
            None if p["tokens_per_s"] is None else round(p["tokens_per_s"]),
            p["train_loss"],
            p["train_bpb"],
            p["val_loss"],
            p["val_bpb"],
        ]
        for p in phases
    ]
    lines += _table(["phase", "status", "steps", "time (s)", "tokens trained", "tokens/s",
                     "train loss", "train bpb", "val loss", "val bpb"], rows)  # fmt: skip
    lines += ["", "Losses are mean next-token cross-entropy in nats; bpb is bits per UTF-8 "
              "byte (see `llm-eval` for the exact held-out figure)."]  # fmt: skip
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    lines += ["", f"## Samples (greedy, up to {SAMPLE_TOKENS} tokens)", ""]
    for prompt, text in samples:
        lines += [f"- **{prompt}** → {' '.join(text.split()) or '(nothing)'}"]
    return "\n".join(lines) + "\n"


def write_train_report(out_dir: str | os.PathLike, argv: Sequence[str], runs, model,
                       tokenizer) -> Path:  # fmt: skip
    """Write ``report.md`` for a finished run. ``runs``: (phase, token cache, TrainResult)
    for each phase this command trained; the samples follow the last phase's kind."""
    out = Path(out_dir)
    phases = [phase_summary(phase, cache, result) for phase, cache, result in runs]
    chat = bool(phases) and phases[-1]["phase"] == "sft"
    was_training = model.training
    model.eval()
    try:
        samples = greedy_samples(model, tokenizer, chat)
    finally:
        model.train(was_training)
    plots = [f"loss_{p['phase']}.png" for p in phases if (out / f"loss_{p['phase']}.png").is_file()]
    path = out / REPORT_FILE
    atomic_write(path, train_report(argv, phases, model, samples, plots))
    return path


# ----------------------------------------------------------------------------- evaluation


def eval_section(argv: Sequence[str], checkpoint: str, text: dict | None,
                 tasks: list[tuple[str, dict]]) -> str:  # fmt: skip
    """The Markdown of one ``llm-eval`` run: text scores and/or one row per task."""
    lines = [f"## Evaluation ({_now()})", "", f"Checkpoint `{checkpoint}`:", "", "```",
             _command(argv), "```", ""]  # fmt: skip
    if text is not None:
        lines += _table(["documents", "bytes", "tokens", "context / stride", "loss",
                         "perplexity", "bits per byte"],
                        [[text["documents"], text["bytes"], text["tokens"],
                          f"{text['context']} / {text['stride']}", text["loss"],
                          text["perplexity"], text["bits_per_byte"]]])  # fmt: skip
        lines.append("")
    if tasks:
        rows = [[name, r["format"], r["items"], r["fewshot"],
                 f"{_fmt(r['acc'])} ± {_fmt(r['acc_stderr'])}",
                 f"{_fmt(r['acc_norm'])} ± {_fmt(r['acc_norm_stderr'])}"]
                for name, r in tasks]  # fmt: skip
        lines += _table(["task", "format", "items", "shots", "acc", "acc_norm"], rows)
        lines.append("")
    return "\n".join(lines)


def append_report(run_dir: str | os.PathLike, section: str) -> Path:
    """Append a section to ``run_dir/report.md`` (started with a title when absent); the
    file is replaced atomically, so a crash leaves the old card or the new one."""
    path = Path(run_dir) / REPORT_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Report card\n"
    atomic_write(path, old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
    return path
