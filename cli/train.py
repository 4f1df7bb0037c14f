"""llm-train: train a tokenizer (when needed) and a model, pretraining and/or SFT.

Parse arguments, call the engine, print where the checkpoint is. Every bad argument or
input is one line on stderr (``llm-train: error: ...``) and exit code 2. Ctrl-C or SIGTERM
stops after the current step, saves a resumable checkpoint and exits 130; a second Ctrl-C
aborts at once without saving. Training flags come from the config dataclasses
(engine.train_config.TrainConfig, engine.config.ModelConfig): declared once, there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path

from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Collect,
    Parser,
    UsageError,
    add_config_flags,
    config_values,
    naming,
    one_line,
    report,
    run_main,
    user_message,
)
from .device import device_and_backend
from .lora_args import add_lora_flags, lora_config, merge_on_save
from .train_inputs import corpus_cache, load_inputs, tokenizer_and_model

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


def _null():
    return contextlib.nullcontext()


def _check_args(args) -> None:
    """Combinations argparse cannot express; each a UsageError before any slow work."""
    if not args.out:
        raise UsageError("--out DIR is required (where the checkpoint goes)")
    if not args.data and not args.chat_data:
        raise UsageError("nothing to train on: give --data PATH... and/or --chat-data PATH...")
    if args.json and not args.plan:
        raise UsageError("--json goes with --plan")
    if args.resume and args.init_from:
        raise UsageError("give either --resume or --init-from, not both")
    if args.init_from and (args.tokenizer or args.vocab_size):
        raise UsageError("--tokenizer/--vocab-size cannot change the tokenizer of --init-from")
    if args.tokenizer and args.vocab_size:
        raise UsageError("give either --tokenizer or --vocab-size, not both")
    if args.pretrain_steps and not args.data:
        raise UsageError("--pretrain-steps needs --data")
    if args.sft_steps and not args.chat_data:
        raise UsageError("--sft-steps needs --chat-data")
    if args.pack and not args.chat_data:
        raise UsageError("--pack needs --chat-data")
    if args.doc_mask is not None and not args.data:
        raise UsageError("--doc-mask/--no-doc-mask need --data (they apply to pretraining)")
    if args.min_lr is not None and args.min_lr > min(args.lr, args.sft_lr or args.lr):
        raise UsageError(f"--min-lr {args.min_lr} is larger than the learning rate")
    cores = os.cpu_count() or 1
    if args.threads and args.threads > cores:
        raise UsageError(f"--threads {args.threads}: this machine has {cores} CPU cores")
    shape = [args.d_model, args.n_layers, args.n_heads, args.n_kv_heads, args.d_ff]
    if args.init_from and any(v is not None for v in shape):
        raise UsageError("the model shape comes from --init-from; drop --d-model/--n-layers/...")


def _typed(argv: list[str]) -> set[str]:
    """The destinations of the flags the user typed (defaults do not count)."""
    parser = build_parser()
    parser.set_defaults(**{k: None for k in vars(parser.parse_args(argv))})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def _phase_configs(args, phases, resume_state):
    """One TrainConfig per phase. A resumed phase keeps its saved schedule; --steps (or
    --pretrain-steps/--sft-steps) extends or shortens it, said in one line; any other
    typed flag it cannot honour is refused."""
    from tritonlm.engine.errors import SettingError
    from tritonlm.engine.fields import flag_of
    from tritonlm.engine.train.run_plan import phase_config, resumed_config
    from tritonlm.engine.train.train_config import TrainConfig

    values = config_values(args, TrainConfig)
    typed = _typed(getattr(args, "argv", []))
    out = {}
    for phase in phases:
        own = args.pretrain_steps if phase == "pretrain" else args.sft_steps
        steps = own or args.steps
        epochs = None if steps is not None else args.epochs
        lr = args.sft_lr if phase == "sft" else None
        if resume_state is None or resume_state.get("phase") != phase:
            # a new run masks documents unless told not to
            packing = {"doc_mask": args.doc_mask is not False} if phase == "pretrain" else {
                "pack": bool(args.pack)}  # fmt: skip
            out[phase] = phase_config(phase, {**values, **packing}, steps=steps, epochs=epochs,
                                      lr=lr)  # fmt: skip
            continue
        # a resumed phase keeps its config: what was typed must agree with it, but --steps
        asked = {k: v for k, v in values.items() if k in typed}
        if getattr(args, "auto_batch", False):
            asked.pop("batch_size", None)  # "auto" is not a value to compare
        if phase == "pretrain" and args.doc_mask is not None:
            asked["doc_mask"] = args.doc_mask
        if phase == "sft" and args.pack:
            asked["pack"] = True
        flags = {"steps": f"--{phase}-steps" if own else "--steps", "lr": "--lr",
                 "doc_mask": "--doc-mask" if args.doc_mask else "--no-doc-mask"}  # fmt: skip
        if steps is not None:
            asked["steps"] = steps
        if epochs is not None and "epochs" in typed:
            asked["epochs"] = epochs
        if lr is not None:
            asked["lr"], flags["lr"] = lr, "--sft-lr"
        try:
            out[phase], note = resumed_config(resume_state["train_config"], asked,
                                              int(resume_state["step"]))  # fmt: skip
        except SettingError as e:
            flag = flags.get(e.field) or flag_of(e.field or "")
            raise UsageError(f"--resume: {flag}{str(e)[len(e.field or '') :]}") from None
        if note:
            print(f"{PROG}: {phase}: {flags['steps']} {steps}: {note}", flush=True)
    return out


def run(args, stop) -> int:
    """Everything after parsing; raises UsageError / engine errors for main() to report."""
    import torch
    from tritonlm.engine.run_lock import exclusive
    from tritonlm.engine.train.distributed import init_distributed
    from tritonlm.engine.train.run_plan import check_run_dir

    _check_args(args)
    from .train_plan import AUTO_GLOBAL_BATCH

    args.auto_batch = args.batch_size == "auto"
    if args.auto_batch:  # resolved once the model is known; a stand-in for the checks
        args.batch_size = AUTO_GLOBAL_BATCH
    lora_config(args)  # bad LoRA flags fail before any loading
    with naming(f"--out {args.out}"):
        out = check_run_dir(args.out)
    device_and_backend(args)  # --device is auto, cpu or cuda here: torchrun picks the GPU
    if not args.resume:  # bad hyperparameters fail before minutes of loading and tokenizing
        _phase_configs(args, [p for p, g in (("pretrain", args.data), ("sft", args.chat_data))
                              if g], None)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun: join the process group (trivial context otherwise). On an error the
    # process exits without tearing the group down; the launcher ends the other ranks.
    ctx = init_distributed(args.device, args.dist_timeout)
    stop.second_aborts = ctx.world_size == 1  # torchrun's agent escalates by itself
    # One writer per run directory (rank 0 writes): a second llm-train on it stops here.
    with naming(f"--out {out}"), exclusive(out, "--out") if ctx.is_main else _null():
        code = _run_phases(args, out, ctx, stop)
    ctx.close()
    return code


def _run_phases(args, out: Path, ctx, stop) -> int:
    import torch
    from tritonlm.cli.progress import TrainingBar
    from tritonlm.engine.data.token_cache import build_chat_cache
    from tritonlm.engine.train.loop import train
    from tritonlm.engine.train.run_plan import check_memory, is_checkpoint, plan_phases
    from tritonlm.engine.train.train_config import TrainingError

    texts, chats = load_inputs(args, ctx)
    ckpt, tokenizer, model = tokenizer_and_model(args, texts, chats, ctx.is_main and not args.quiet)
    resume_state = ckpt.trainer_state if args.resume else None
    available = (["pretrain"] if texts else []) + (["sft"] if chats else [])
    try:
        asked = {p: s for p, s in (("pretrain", args.pretrain_steps or args.steps),
                                   ("sft", args.sft_steps or args.steps)) if s}  # fmt: skip
        phases = plan_phases(available, resume_state, asked)
    except TrainingError as e:
        raise UsageError(f"--resume {args.resume}: {e}") from None
    if not phases:
        if ctx.is_main:
            print(f"nothing left to train; checkpoint: {ckpt.path}")
        return EXIT_OK
    configs = _phase_configs(args, phases, resume_state)
    device = ctx.device or torch.device("cuda" if args.device != "cpu" and
                                        torch.cuda.is_available() else "cpu")  # fmt: skip
    if args.auto_batch and resume_state is None:
        configs = _auto_batch(args, phases, model, configs, device, ctx)
    for cfg in configs.values():  # refuse what cannot fit before tokenizing anything
        if not args.plan:  # a plan says what fits instead
            check_memory(model.config, cfg.batch_size, cfg.seq_len or model.config.max_seq_len,
                         device)  # fmt: skip
    fresh_over_old = resume_state is None and is_checkpoint(out) and ctx.is_main
    cache_dir = Path(args.cache_dir) if args.cache_dir else out.resolve().parent / ".cache"
    bar = TrainingBar(enabled=not args.quiet and ctx.is_main)
    summary, runs, plans = [], [], []  # runs: (phase, cache, result) for the report card
    for phase in phases:
        with naming(f"--cache-dir {cache_dir}"):
            if phase == "pretrain":
                cache = corpus_cache(args, texts, tokenizer, cache_dir, ctx)
            else:
                cache = build_chat_cache(chats, tokenizer, cache_dir)
        ctx.check_same(cache.key, f"the tokenized {phase} data (or the tokenizer)")
        if args.plan:
            from tritonlm.engine.train.plan import plan_run

            plans.append(plan_run(model, tokenizer, cache, configs[phase], device=device,
                                  world_size=ctx.world_size))  # fmt: skip
            continue
        resuming = resume_state is not None and resume_state.get("phase") == phase
        try:
            with stop.deferred():  # from here a signal stops at the next step boundary
                result = train(model, tokenizer, cache, configs[phase], out, progress=bar,
                               resume=ckpt if resuming else None,
                               extra_state={"phases": phases}, dist=ctx, stop=stop,
                               replace_metrics=fresh_over_old)  # fmt: skip
        finally:
            bar.close()
        fresh_over_old = False
        if result.status == "interrupted":
            if ctx.is_main:
                print(f"{PROG}: interrupted at {phase} step {result.step}; resumable "
                      f"checkpoint saved to {result.checkpoint} (continue with --resume "
                      f"{result.checkpoint})", file=sys.stderr, flush=True)  # fmt: skip
            return EXIT_INTERRUPTED
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        early = " (early stop)" if result.status == "early_stopped" else ""
        pad = "" if result.pad_fraction is None else f", padding {result.pad_fraction:.1%}"
        guard = ""
        if result.guard and any(result.guard.values()):
            guard = (f", guard: {result.guard['skipped']} skipped updates, "
                     f"{result.guard['rollbacks']} rollbacks")  # fmt: skip
        summary.append(f"{phase}: {result.step} steps{early}, loss {result.loss:.4f}{val}{pad}"
                       f"{guard}")  # fmt: skip
        if ctx.is_main:
            for note in result.notes:  # e.g. how many conversations --pack had to split
                print(f"{phase}: {note}")
        runs.append((phase, cache, result))
    if args.plan:
        if ctx.is_main:
            from .train_plan import print_plans

            print_plans(plans, args.json)
        return EXIT_OK
    if ctx.is_main:
        from tritonlm.engine.eval.report import write_train_report

        if merge_on_save(args, out, model, tokenizer):
            summary.append("adapters merged into a full checkpoint")

        write_train_report(out, [PROG, *getattr(args, "argv", [])], runs, model, tokenizer)
        print("; ".join(summary))
        print(f"checkpoint: {out}")
    return EXIT_OK


def _auto_batch(args, phases, model, configs, device, ctx):
    """--batch-size auto: the micro-batch and grad-accum the plan picks for the first phase
    (every phase then uses them)."""
    from .train_plan import auto_batch

    first = configs[phases[0]]
    seq_len = first.seq_len or model.config.max_seq_len
    args.batch_size, args.grad_accum = auto_batch(model.config, first, device, seq_len,
                                                  args.grad_accum)  # fmt: skip
    if ctx.is_main and not args.quiet and not args.plan:
        print(f"batch size auto: --batch-size {args.batch_size} --grad-accum {args.grad_accum}",
              flush=True)  # fmt: skip
    return _phase_configs(args, phases, None)


# ----------------------------------------------------------------------------- main


def _on_error(prog: str, e: Exception) -> int:
    """One line, exit 2. Under torchrun, prefixed with the rank; an error every rank hits
    together (a training stop decided on rank 0) is reported by rank 0 alone."""
    from tritonlm.engine.train.distributed import DistributedError, torchrun_env
    from tritonlm.engine.train.train_config import TrainingError

    message = one_line(user_message(e))
    try:
        env = torchrun_env()
    except DistributedError:
        env = None
    if env is not None and env.world_size > 1:
        together = isinstance(e, TrainingError) and not isinstance(e, DistributedError)
        if together and env.rank != 0:
            return EXIT_ERROR
        if not message.startswith("rank "):
            message = f"rank {env.rank} of {env.world_size}: {message}"
    return report(prog, message)


def main(argv=None) -> int:
    from tritonlm.engine.stop import StopRequest

    stop = StopRequest()

    def announce(name: str) -> None:
        print(f"\n{PROG}: {name}: stopping after this step and saving; Ctrl-C again to abort",
              file=sys.stderr, flush=True)  # fmt: skip

    def abort(name: str) -> None:
        print(f"\n{PROG}: {name} again: aborted without saving; the last complete checkpoint "
              "is unchanged", file=sys.stderr, flush=True)  # fmt: skip

    stop.on_first, stop.on_abort = announce, abort
    stop.install()  # whatever SIGINT/SIGTERM handling this process inherited
    try:
        argv = list(sys.argv[1:] if argv is None else argv)  # the report card shows it
        given = argparse.Namespace(argv=argv)
        return run_main(PROG, lambda: run(build_parser().parse_args(argv, given), stop), _on_error)
    finally:
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
