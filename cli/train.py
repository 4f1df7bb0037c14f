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
import os
import sys
from pathlib import Path

from tritonlm.engine.fields import with_flag

from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    config_values,
    naming,
    one_line,
    report,
    run_main,
    user_message,
)
from .device import device_and_backend
from .lora_args import lora_config, merge_on_save
from .train_flags import PROG, build_parser
from .train_inputs import corpus_cache, load_inputs, tokenizer_and_model


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
        raise UsageError(f"--resume {args.resume}: {user_message(e)}") from None
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
                print(f"{phase}: {with_flag(note)}")
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
