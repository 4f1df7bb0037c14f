"""llm-train's command line: every flag, its help and its type, grouped as --help shows
them (data, corpus, model, training, runtime, LoRA). The config dataclasses declare the
training and model flags (engine.fields); the rest are the front end's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from .common import Collect, Parser, add_config_flags
from .lora_args import add_lora_flags

PROG = "llm-train"

EPILOG = """\
examples:
  # pretrain then instruction-tune the tiny 'seed' model on the bundled data (CPU, minutes)
  llm-train --data data/pretrain.json --chat-data data/chat.json --preset seed \\
            --out runs/demo --pretrain-steps 600 --sft-steps 300
  # pretraining only, a bigger model, your own files or folders (txt/json/jsonl/csv)
  llm-train --data corpus/ --preset small --vocab-size 8192 --steps 5000 --out runs/small
  # instruction-tune an existing checkpoint (its tokenizer and shape are kept)
  llm-train --init-from runs/small --chat-data chats.jsonl --steps 500 --out runs/small-chat
  # LoRA: adapters of rank 8 on a frozen imported model (see the README's walk-through)
  llm-train --init-from runs/smol --chat-data chats.jsonl --lora-rank 8 --out runs/smol-lora
  # continue an interrupted run (same data arguments as the first time)
  llm-train --resume runs/demo --data data/pretrain.json --chat-data data/chat.json \\
            --out runs/demo
  # 4 GPUs on one node (global batch = batch-size x 4 x grad-accum); see the README
  torchrun --nproc_per_node=4 $(which llm-train) --data corpus/ --preset small --out runs/ddp

Checkpoints are resumable (optimizer, schedule, RNG and data position are saved). Ctrl-C
(or SIGTERM) stops after the current step and saves; a second Ctrl-C aborts without saving.
The run directory also gets metrics.jsonl, loss_<phase>.png and, when the run finishes,
report.md (llm-eval --report adds to it). Tokenized data is cached in --cache-dir
(default: a .cache folder next to --out).
"""


def build_parser() -> Parser:
    p = Parser(prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Train a small decoder-only language model: BPE tokenizer, "
               "pretraining on plain text (--data) and/or instruction tuning on chats "
               "(--chat-data).")  # fmt: skip
    _data_flags(p.add_argument_group("data and output"))
    _model_flags(p.add_argument_group("model"))
    add_lora_flags(p.add_argument_group("LoRA (parameter-efficient fine-tuning)"))
    _training_flags(p.add_argument_group("training"))
    _runtime_flags(p.add_argument_group("runtime"))
    for action in p._actions:  # --batch-size also takes "auto"
        if action.dest == "batch_size":
            action.type, action.metavar = _batch_size(action.type), "N|auto"
            action.help += "; auto: the largest that fits, same global batch (16 x --grad-accum)"
    return p


def _data_flags(d) -> None:
    d.add_argument(
        "--data",
        nargs="+",
        action=Collect,
        metavar="PATH",
        help="pretraining text: files, folders or glob patterns of .txt/.json/.jsonl/.csv/"
        ".parquet, .jsonl.gz/.zst, .txt.gz/.zst, and plain text/source files (--text-ext)",
    )
    d.add_argument(
        "--chat-data",
        nargs="+",
        action=Collect,
        metavar="PATH",
        help="instruction data: .json "
        "('User: ... Assistant: ...' strings), .jsonl(.gz/.zst) ({'messages': [...]}) or "
        ".parquet (a 'messages' column)",
    )
    _corpus_flags(d)
    d.add_argument("--out", metavar="DIR", help="run / checkpoint directory (required)")
    d.add_argument("--cache-dir", metavar="DIR", help="token cache (default: <out>/../.cache)")


def _corpus_flags(d) -> None:
    from tritonlm.engine.data.corpus_formats import DEFAULT_TEXT_EXTS

    d.add_argument("--text-field", default="text", metavar="NAME",
                   help="the JSONL key / Parquet column of the text (default: text)")  # fmt: skip
    d.add_argument("--text-ext", type=_ext_list, nargs="+", action=Collect,
                   default=DEFAULT_TEXT_EXTS, metavar="EXTS",
                   help="comma-separated extensions read as plain text besides .txt "
                   "(default: .md,.rst,.py,.c,... ; '' for none)")  # fmt: skip
    d.add_argument("--workers", type=_positive, metavar="N",
                   help="processes for tokenizing the corpus (default: all cores); the "
                   "token cache is the same for any number")  # fmt: skip
    d.add_argument("--tokenizer-sample-bytes", type=_size, default=300 * 10**6, metavar="SIZE",
                   help="text a new tokenizer learns from, spread over the corpus (e.g. "
                   "300MB, 2GiB; 1GB = 10^9 bytes; default: 300MB)")  # fmt: skip


def _ext_list(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _size(text: str) -> int:
    from tritonlm.engine.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_flags(m) -> None:
    from tritonlm.engine.model.config import PRESETS, ModelConfig
    from tritonlm.engine.train.run_plan import DEFAULT_VOCAB

    m.add_argument(
        "--preset", choices=tuple(PRESETS), default="seed", help="model size (default: seed)"
    )
    add_config_flags(m, ModelConfig, defaults=False)  # --d-model --n-layers ... --dropout
    vocab = ", ".join(f"{k} {v}" for k, v in DEFAULT_VOCAB.items())
    m.add_argument(
        "--vocab-size",
        type=_positive,
        metavar="N",
        help=f"train a tokenizer of this size (default: {vocab})",
    )
    m.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json instead")
    m.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from this checkpoint's (or Hugging Face Llama folder's) weights and tokenizer",
    )
    m.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue a run from a resumable "
        "checkpoint: repeat the first command and add --resume (model and "
        "tokenizer options are then taken from the checkpoint)",
    )


def _training_flags(t) -> None:
    from tritonlm.engine.train.run_plan import DEFAULT_STEPS
    from tritonlm.engine.train.train_config import TrainConfig

    steps = ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
    length = t.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=_positive, metavar="N", help=f"optimizer steps per phase (default: {steps})"
    )
    length.add_argument(
        "--epochs",
        type=_epochs,
        metavar="E",
        help="passes over the training split per phase, instead of --steps",
    )
    t.add_argument(
        "--pretrain-steps", type=_positive, metavar="N", help="steps of the pretraining phase"
    )
    t.add_argument("--sft-steps", type=_positive, metavar="N", help="steps of the SFT phase")
    t.add_argument(
        "--sft-lr",
        type=_positive_float,
        metavar="LR",
        help="peak learning rate of the SFT phase (default: --lr)",
    )
    from tritonlm.engine.train.run_plan import RUNTIME_FIELDS  # a --resume may change them

    names = [n for n in _flag_names(TrainConfig) if n not in RUNTIME_FIELDS]
    add_config_flags(t, TrainConfig, names)
    t.add_argument(
        "--doc-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pretraining: attention stays inside each document and positions restart at "
        "each (default: on for new runs; a resumed run keeps its own choice)",
    )
    t.add_argument(
        "--pack",
        action="store_true",
        help="SFT: pack whole conversations into full rows instead of padding each batch "
        "(long ones split at turn boundaries)",
    )


def _runtime_flags(r) -> None:
    from tritonlm.engine.train.run_plan import RUNTIME_FIELDS
    from tritonlm.engine.train.train_config import TrainConfig

    add_config_flags(r, TrainConfig, RUNTIME_FIELDS)
    r.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="CPU threads for torch (default: torch's choice)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--plan",
        action="store_true",
        help="print what the run needs (memory by part, the micro-batch that fits, "
        "FLOPs, time from a 3-step probe, checkpoint size) and exit; see README",
    )
    r.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    r.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="under torchrun: seconds a collective may wait for the other ranks "
        "before the run fails (a dead or hung rank; default: 300)",
    )


def _flag_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _positive(text: str) -> int:
    if not text.strip().lstrip("+").isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _batch_size(number):
    def parse(text: str):
        return "auto" if text.strip().lower() == "auto" else number(text)

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


_epochs = _positive_float


# ----------------------------------------------------------------------------- the run
