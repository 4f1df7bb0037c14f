"""llm-eval: how good is a checkpoint? Bits per byte on text, accuracy on multiple choice.

Parse arguments, call the engine (engine/eval_text.py, engine/eval_choice.py), print a
summary or one JSON object, and optionally append the results to a run's report.md.
Every bad argument or input is one line on stderr (``llm-eval: error: ...``), exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Collect, Parser, UsageError, naming, run_main
from .device import add_device_flags, device_and_backend
from .threads_flag import add_threads_flag, apply_threads

PROG = "llm-eval"

EPILOG = """\
examples:
  # bits per byte on held-out text (any format llm-train reads), sliding window
  llm-eval runs/demo --data heldout.txt --stride 128
  # multiple choice: HellaSwag / ARC / MMLU / plain JSONL, format detected
  llm-eval runs/demo --task hellaswag_val.jsonl --fewshot 5 --limit 500
  # both, as JSON, and appended to the run's report card
  llm-eval runs/demo --data heldout.txt --task arc.jsonl --json --report runs/demo

definitions:
  bits per byte  sum of token NLL (nats) / ln 2 / UTF-8 bytes of the documents as read;
                 every token of a document is scored given <|bos|> and all before it
  acc            argmax of the choices' log-likelihoods is the gold one
  acc_norm       the same with each log-likelihood divided by the choice's length in
                 characters (lm-evaluation-harness's definition); +- is the standard error
"""


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def build_parser() -> Parser:
    from tritonlm.engine.eval.task_formats import FORMATS

    p = Parser(prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Evaluate a checkpoint: loss, perplexity and bits per byte on "
               "text (--data), acc and acc_norm on multiple-choice tasks (--task).")  # fmt: skip
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    t = p.add_argument_group("text")
    t.add_argument(
        "--data",
        nargs="+",
        action=Collect,
        metavar="PATH",
        help="held-out text: files or folders in any format llm-train reads",
    )
    t.add_argument(
        "--context",
        type=_positive,
        metavar="N",
        help="window length in tokens (default: the model's context)",
    )
    t.add_argument(
        "--stride",
        type=_positive,
        metavar="N",
        help="tokens between window starts (default: half the window)",
    )
    c = p.add_argument_group("multiple choice")
    c.add_argument("--task", nargs="+", action=Collect, metavar="FILE",
                   help="task files (.jsonl; repeatable)")  # fmt: skip
    c.add_argument("--format", choices=FORMATS, help="task format (default: detected)")
    c.add_argument(
        "--fewshot",
        type=_count,
        default=0,
        metavar="K",
        help="solved examples before each question (default: 0)",
    )
    c.add_argument(
        "--seed",
        type=_count,
        default=1234,
        metavar="S",
        help="seed of the few-shot draw (default: 1234)",
    )
    c.add_argument("--limit", type=_positive, metavar="N", help="score the first N items")
    r = p.add_argument_group("runtime and output")
    r.add_argument(
        "--batch-size",
        type=_positive,
        default=8,
        metavar="N",
        help="rows per forward pass (default: 8)",
    )
    add_device_flags(r)
    add_threads_flag(r)
    r.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                   help="int8: weight-only int8 matrices and head (as llm-chat)")  # fmt: skip
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--report", metavar="DIR", help="append the results to DIR/report.md")
    r.add_argument("--quiet", action="store_true", help="no progress bar")  # fmt: skip
    return p


class _Bar:
    """A tqdm bar on a terminal; nothing when quiet or when stderr is not a terminal."""

    def __init__(self, enabled: bool, desc: str):
        self.bar, self.enabled, self.desc = None, enabled and sys.stderr.isatty(), desc

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _text_line(t: dict) -> str:
    docs = f"{t['documents']} document{'s' if t['documents'] != 1 else ''}"
    return (f"text: {docs}, {t['bytes']:,} bytes, {t['tokens']:,} tokens (window "
            f"{t['context']}, stride {t['stride']}): loss {t['loss']:.4f}, perplexity "
            f"{t['perplexity']:.3f}, bits per byte {t['bits_per_byte']:.4f}")  # fmt: skip


def _task_line(name: str, r: dict) -> str:
    def pm(key):
        err = r[f"{key}_stderr"]
        return f"{r[key]:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    return (f"{name} ({r['format']}, {r['items']} items, {r['fewshot']}-shot): "
            f"acc {pm('acc')}, acc_norm {pm('acc_norm')}")  # fmt: skip


def run(args, argv: list[str]) -> int:
    if not args.data and not args.task:
        raise UsageError("nothing to evaluate: give --data PATH... and/or --task FILE...")
    if args.report and not Path(args.report).is_dir():
        raise UsageError(f"--report {args.report}: not a directory")
    from tritonlm.engine.data.records import load_texts
    from tritonlm.engine.eval.choice import evaluate_choices
    from tritonlm.engine.eval.task_formats import load_task
    from tritonlm.engine.eval.text import evaluate_texts
    from tritonlm.engine.lora.adapter_checkpoint import load_model

    device = device_and_backend(args)
    apply_threads(args)
    tasks = [(path, *load_task(path, args.format)) for path in args.task or []]  # fail fast
    texts = load_texts(args.data, option="--data") if args.data else None
    # LoRA: base + adapters, merged
    ckpt = load_model(args.checkpoint, device=device, backend=args.backend)
    from tritonlm.engine.model.inference_weights import prepare_inference_weights

    prepare_inference_weights(ckpt.model, args.weights)  # int8 if asked; CPU: column-major
    max_len = ckpt.model.config.max_seq_len
    if args.context and args.context > max_len:
        raise UsageError(f"--context {args.context} exceeds the model's context {max_len}")
    if args.stride and args.stride > (args.context or max_len):
        raise UsageError(f"--stride {args.stride} is larger than the window "
                         f"{args.context or max_len}")  # fmt: skip
    result = {"checkpoint": str(args.checkpoint), "weights": args.weights, "text": None,
              "tasks": []}  # fmt: skip
    if texts is not None:
        if not args.quiet and not args.json:
            print(f"data: {texts.summary('documents')}", file=sys.stderr, flush=True)
        bar = _Bar(not args.quiet, "text")
        try:
            score = evaluate_texts(ckpt.model, ckpt.tokenizer, texts.items, args.context,
                                   args.stride, args.batch_size, bar)  # fmt: skip
        finally:
            bar.close()
        result["text"] = score.to_dict()
    for path, fmt, items in tasks:
        bar = _Bar(not args.quiet, Path(path).name)
        try:
            r = evaluate_choices(
                ckpt.model,
                ckpt.tokenizer,
                items,
                fmt,
                args.fewshot,
                args.seed,
                args.limit,
                args.batch_size,
                bar,
                source=path,
            )
        finally:
            bar.close()
        result["tasks"].append({"file": str(path), **r.to_dict()})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if result["text"] is not None:
            print(_text_line(result["text"]))
        for t in result["tasks"]:
            print(_task_line(Path(t["file"]).name, t))
    if args.report:
        from tritonlm.engine.eval.report import append_report, eval_section

        named = [(Path(t["file"]).name, t) for t in result["tasks"]]
        section = eval_section([PROG, *argv], str(args.checkpoint), result["text"], named)
        with naming(f"--report {args.report}"):
            path = append_report(args.report, section)
        if not args.json and not args.quiet:
            print(f"report: {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(PROG, lambda: run(build_parser().parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
