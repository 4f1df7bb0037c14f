"""llm-train: train a tokenizer (when needed) and a model, pretraining and/or SFT.

Parse and validate arguments, call the engine, print where the checkpoint is. Every bad
argument or input is one line on stderr (``llm-train: error: ...``) and exit code 2;
Ctrl-C saves a resumable checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130

DEFAULT_VOCAB = {"seed": 512, "small": 4096, "gpt2": 8192}
DEFAULT_STEPS = {"pretrain": 1000, "sft": 300}

EPILOG = """\
examples:
  # pretrain then instruction-tune the tiny 'seed' model on the bundled data (CPU, minutes)
  llm-train --data data/pretrain.json --chat-data data/chat.json --preset seed \\
            --out runs/demo --pretrain-steps 600 --sft-steps 300
  # pretraining only, a bigger model, your own files or folders (txt/json/jsonl/csv)
  llm-train --data corpus/ --preset small --vocab-size 8192 --steps 5000 --out runs/small
  # instruction-tune an existing checkpoint (its tokenizer and shape are kept)
  llm-train --init-from runs/small --chat-data chats.jsonl --steps 500 --out runs/small-chat
  # continue an interrupted run (same data arguments as the first time)
  llm-train --resume runs/demo --data data/pretrain.json --chat-data data/chat.json \\
            --out runs/demo
  # 4 GPUs on one node (global batch = batch-size x 4 x grad-accum); see the README
  torchrun --nproc_per_node=4 $(which llm-train) --data corpus/ --preset small --out runs/ddp

Checkpoints are resumable (optimizer, schedule, RNG and data position are saved). The run
directory also gets metrics.jsonl and loss_<phase>.png. Tokenized data is cached in
--cache-dir (default: a .cache folder next to --out).
"""


class CliError(Exception):
    """A usage or input problem: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, no usage dump
        raise CliError(f"{message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _number(lo: float | None = None, lo_open: bool = False, hi: float | None = None, hi_open=False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llm-train",
        description="Train a small decoder-only language model: BPE tokenizer, pretraining "
        "on plain text (--data) and/or instruction tuning on chats (--chat-data).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data and output")
    d.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="pretraining text: files or folders of .txt/.json/.jsonl/.csv",
    )
    d.add_argument(
        "--chat-data",
        nargs="+",
        metavar="PATH",
        help="instruction data: .json "
        "('User: ... Assistant: ...' strings) or .jsonl ({'messages': [...]})",
    )
    d.add_argument("--out", metavar="DIR", help="run / checkpoint directory (required)")
    d.add_argument("--cache-dir", metavar="DIR", help="token cache (default: <out>/../.cache)")

    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        choices=("seed", "small", "gpt2"),
        default="seed",
        help="model size (default: seed)",
    )
    m.add_argument("--d-model", type=_positive_int, metavar="N", help="override the preset")
    m.add_argument("--n-layers", type=_positive_int, metavar="N", help="override the preset")
    m.add_argument("--n-heads", type=_positive_int, metavar="N", help="override the preset")
    m.add_argument("--d-ff", type=_positive_int, metavar="N", help="override the preset")
    m.add_argument(
        "--seq-len",
        type=_positive_int,
        metavar="N",
        help="context length (new model: its max_seq_len; else <= the model's)",
    )
    m.add_argument(
        "--dropout",
        type=_number(0.0, hi=1.0, hi_open=True),
        metavar="P",
        help="dropout probability (default: preset's, 0)",
    )
    m.add_argument(
        "--vocab-size",
        type=_positive_int,
        metavar="N",
        help="train a tokenizer of this size (default: seed 512, small 4096, gpt2 8192)",
    )
    m.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json instead")
    m.add_argument(
        "--init-from", metavar="CKPT", help="start from this checkpoint's weights and tokenizer"
    )
    m.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue a run from a resumable checkpoint: repeat the first command and add "
        "--resume (model and tokenizer options are then taken from the checkpoint)",
    )

    t = p.add_argument_group("training")
    length = t.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="optimizer steps per phase (default: pretrain 1000, sft 300)",
    )
    length.add_argument(
        "--epochs",
        type=_number(0.0, lo_open=True),
        metavar="E",
        help="passes over the training split per phase, instead of --steps",
    )
    t.add_argument(
        "--pretrain-steps", type=_positive_int, metavar="N", help="steps of the pretraining phase"
    )
    t.add_argument("--sft-steps", type=_positive_int, metavar="N", help="steps of the SFT phase")
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        metavar="N",
        help="sequences per micro-batch (default: 16)",
    )
    t.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    t.add_argument(
        "--lr",
        type=_number(0.0, lo_open=True),
        default=1e-3,
        help="peak learning rate (default: 1e-3)",
    )
    t.add_argument(
        "--sft-lr",
        type=_number(0.0, lo_open=True),
        help="peak learning rate of the SFT phase (default: --lr)",
    )
    t.add_argument(
        "--min-lr", type=_number(0.0), help="final cosine learning rate (default: lr/10)"
    )
    t.add_argument(
        "--warmup",
        type=_nonneg_int,
        metavar="N",
        help="linear warmup steps (default: min(100, total steps / 10))",
    )
    t.add_argument(
        "--weight-decay",
        type=_number(0.0),
        default=0.1,
        help="AdamW weight decay on matrices (default: 0.1)",
    )
    t.add_argument(
        "--grad-clip",
        type=_number(0.0),
        default=1.0,
        help="clip the global gradient norm; 0 = off (default: 1.0)",
    )
    t.add_argument("--seed", type=_nonneg_int, default=1337, help="random seed (default: 1337)")
    t.add_argument(
        "--val-fraction",
        type=_number(0.0, hi=1.0, hi_open=True),
        default=0.05,
        help="held-out share of the data (default: 0.05)",
    )
    t.add_argument(
        "--eval-every",
        type=_nonneg_int,
        default=100,
        metavar="N",
        help="evaluate (and save) every N steps; 0 = never (default: 100)",
    )
    t.add_argument(
        "--eval-batches",
        type=_positive_int,
        default=20,
        metavar="N",
        help="validation batches per evaluation (default: 20)",
    )
    t.add_argument(
        "--patience",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="stop after N evaluations without improvement; 0 = off (default: 0)",
    )
    t.add_argument(
        "--save-every",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="save a checkpoint every N steps (default: with each evaluation)",
    )

    r = p.add_argument_group("runtime")
    r.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: cuda when available",
    )
    r.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="kernels: auto = Triton on CUDA, torch reference otherwise",
    )
    r.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    r.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--dist-timeout",
        type=_number(0.0, lo_open=True),
        default=300.0,
        metavar="S",
        help="under torchrun: seconds a collective may wait for the other ranks before "
        "the run fails (a dead or hung rank; default: 300)",
    )
    return p


# ----------------------------------------------------------------------------- steps


def _is_checkpoint(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == "tritonlm-checkpoint"


def _check_out(args) -> Path:
    if not args.out:
        raise CliError("--out DIR is required (where the checkpoint goes)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_checkpoint(out):
        raise CliError(
            f"--out {out}: directory is not empty and not a tritonlm checkpoint; "
            "choose a new or empty directory"
        )
    return out


def _phase_config(args, phase: str, resume_cfg: dict | None):
    from tritonlm.engine.train import TrainConfig

    runtime = {"device": args.device, "backend": args.backend, "dtype": args.dtype}
    if resume_cfg is not None:  # the resumed phase keeps its schedule
        return TrainConfig.from_dict({**resume_cfg, **runtime})
    steps = args.pretrain_steps if phase == "pretrain" else args.sft_steps
    epochs = None
    if steps is None:
        steps = args.steps
    if steps is None and args.epochs is not None:
        epochs = args.epochs
    if steps is None and epochs is None:
        steps = DEFAULT_STEPS[phase]
    lr = args.sft_lr if (phase == "sft" and args.sft_lr) else args.lr
    return TrainConfig(
        phase=phase,
        steps=steps,
        epochs=epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=lr,
        min_lr=args.min_lr,
        warmup=args.warmup,  # None: min(100, total steps / 10), resolved by the trainer
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        patience=args.patience,
        val_fraction=args.val_fraction,
        save_every=args.save_every,
        **runtime,
    )


def _tokenizer_texts(texts, chats):
    yield from texts or ()
    for chat in chats or ():
        for msg in chat:
            yield msg["content"]


def _build_model(args, tokenizer):
    from tritonlm.engine.config import ModelConfig
    from tritonlm.engine.model import Transformer

    overrides = {
        k: v
        for k, v in (
            ("d_model", args.d_model),
            ("n_layers", args.n_layers),
            ("n_heads", args.n_heads),
            ("d_ff", args.d_ff),
            ("max_seq_len", args.seq_len),
            ("dropout", args.dropout),
        )
        if v is not None
    }
    cfg = ModelConfig.preset(args.preset, tokenizer.vocab_size, **overrides)
    return Transformer(cfg)


def _set_dropout(model, p: float) -> None:
    import torch

    model.config = model.config.replace(dropout=p)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p


class _Bar:
    """tqdm progress bar for one phase (stderr), fed by the engine's progress events."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        kind = ev["event"]
        if kind == "start":
            self.close()
            self.bar = tqdm(
                total=ev["total_steps"],
                initial=ev["step"],
                desc=ev["phase"],
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        elif kind == "step" and self.bar is not None:
            post = {"loss": f"{ev['loss']:.3f}", "tok/s": f"{ev['tokens_per_s']:.0f}"}
            if "val_loss" in ev:
                self.val = f"{ev['val_loss']:.3f}"
            if getattr(self, "val", None):
                post["val"] = self.val
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(ev["step"] - self.bar.n)
        elif kind == "done":
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.val = None


def _stop_on_sigterm() -> None:
    """Treat SIGTERM (a job scheduler's stop, `kill`) like Ctrl-C: save a resumable
    checkpoint and exit 130. Single process only: under torchrun every rank gets the
    signal at a different point, and the launcher kills them shortly after anyway."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(args) -> int:
    """Everything after parsing; raises CliError / engine errors for main() to report."""
    import torch
    from tritonlm.engine.distributed import init_distributed

    if not args.data and not args.chat_data:
        raise CliError("nothing to train on: give --data PATH... and/or --chat-data PATH...")
    if args.resume and args.init_from:
        raise CliError("give either --resume or --init-from, not both")
    if args.init_from and (args.tokenizer or args.vocab_size):
        raise CliError("--tokenizer/--vocab-size cannot change the tokenizer of --init-from")
    if args.tokenizer and args.vocab_size:
        raise CliError("give either --tokenizer or --vocab-size, not both")
    if args.pretrain_steps and not args.data:
        raise CliError("--pretrain-steps needs --data")
    if args.sft_steps and not args.chat_data:
        raise CliError("--sft-steps needs --chat-data")
    if args.min_lr is not None and args.min_lr > min(args.lr, args.sft_lr or args.lr):
        raise CliError(f"--min-lr {args.min_lr} is larger than the learning rate")
    shape_flags = [args.d_model, args.n_layers, args.n_heads, args.d_ff]
    if args.init_from and any(v is not None for v in shape_flags):
        raise CliError("the model shape comes from --init-from; drop --d-model/--n-layers/...")
    out = _check_out(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine")
    from tritonlm.kernels.dispatch import check_backend

    check_backend(
        args.backend, "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun: join the process group (trivial context otherwise). On an error the
    # process exits without tearing the group down; the launcher ends the other ranks.
    ctx = init_distributed(args.device, args.dist_timeout)
    if ctx.world_size == 1:
        _stop_on_sigterm()
    code = _run_phases(args, out, ctx)
    ctx.close()
    return code


def _run_phases(args, out: Path, ctx) -> int:
    import torch
    from tritonlm.engine.checkpoint import load_checkpoint
    from tritonlm.engine.data import load_chats, load_texts
    from tritonlm.engine.token_cache import build_chat_cache, build_pretrain_cache
    from tritonlm.engine.tokenizer import BpeTokenizer, BpeTokenizerConfig
    from tritonlm.engine.train import TrainingError, train

    if not args.resume:  # bad hyperparameters fail before minutes of loading and tokenizing
        for phase, given in (("pretrain", args.data), ("sft", args.chat_data)):
            if given:
                _phase_config(args, phase, None)
    texts = chats = None
    for kind, paths, load in (
        ("documents", args.data, load_texts),
        ("chats", args.chat_data, load_chats),
    ):
        if not paths:
            continue
        loaded = load(paths)
        if ctx.is_main and not args.quiet:
            print(f"data: {loaded.summary(kind)}")
        if kind == "documents":
            texts = loaded.items
        else:
            chats = loaded.items

    # tokenizer and model
    ckpt = None
    if args.resume or args.init_from:
        ckpt = load_checkpoint(args.resume or args.init_from, backend=args.backend)
        tokenizer, model = ckpt.tokenizer, ckpt.model
        if args.resume and not ckpt.resumable:
            raise CliError(f"--resume {args.resume}: not a resumable checkpoint")
        if args.seq_len and args.seq_len > model.config.max_seq_len:
            raise CliError(
                f"--seq-len {args.seq_len} exceeds the checkpoint's max_seq_len "
                f"{model.config.max_seq_len}"
            )
        if args.dropout is not None and args.init_from:
            _set_dropout(model, args.dropout)
    else:
        if args.tokenizer:
            tokenizer = BpeTokenizer.load(args.tokenizer)
        else:
            vocab = args.vocab_size or DEFAULT_VOCAB[args.preset]
            tokenizer = BpeTokenizer.train(
                _tokenizer_texts(texts, chats), BpeTokenizerConfig(vocab_size=vocab)
            )
        torch.manual_seed(args.seed)
        model = _build_model(args, tokenizer)

    phases = (["pretrain"] if texts else []) + (["sft"] if chats else [])
    resume_state = ckpt.trainer_state if args.resume else None
    if resume_state is not None:
        done_phase = resume_state.get("phase")
        if done_phase not in phases:
            raise CliError(
                f"--resume {args.resume}: the checkpoint is in phase {done_phase!r}; "
                f"give its data ({'--data' if done_phase == 'pretrain' else '--chat-data'})"
            )
        finished = resume_state.get("step", 0) >= resume_state.get("total_steps", 0)
        first = phases.index(done_phase) + (1 if finished else 0)
        phases = phases[first:]
        if not phases:
            if ctx.is_main:
                print(f"nothing left to train; checkpoint: {ckpt.path}")
            return EXIT_OK
    fresh_over_old = resume_state is None and _is_checkpoint(out) and ctx.is_main

    cache_dir = Path(args.cache_dir) if args.cache_dir else out.resolve().parent / ".cache"
    bar = _Bar(args.quiet or not ctx.is_main)
    summary = []
    for phase in phases:
        resuming = resume_state is not None and resume_state.get("phase") == phase
        cfg = _phase_config(args, phase, resume_state["train_config"] if resuming else None)
        if phase == "pretrain":
            cache = build_pretrain_cache(texts, tokenizer, cache_dir)
        else:
            cache = build_chat_cache(chats, tokenizer, cache_dir)
        ctx.check_same(cache.key, f"the tokenized {phase} data (or the tokenizer)")
        try:
            result = train(
                model,
                tokenizer,
                cache,
                cfg,
                out,
                progress=bar,
                resume=ckpt if resuming else None,
                extra_state={"phases": phases},
                dist=ctx,
                replace_metrics=fresh_over_old,  # the first phase of a new run over an old one
            )
            fresh_over_old = False
        finally:
            bar.close()
        if result.status == "interrupted":
            if not ctx.is_main:
                return EXIT_INTERRUPTED
            print(
                f"llm-train: interrupted at {phase} step {result.step}; resumable checkpoint "
                f"saved to {result.checkpoint} (continue with --resume {result.checkpoint})",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        stop = " (early stop)" if result.status == "early_stopped" else ""
        summary.append(f"{phase}: {result.step} steps{stop}, loss {result.loss:.4f}{val}")
        if result.checkpoint is None:
            raise TrainingError("no checkpoint was written")
    if ctx.is_main:
        print("; ".join(summary))
        print(f"checkpoint: {out}")
    return EXIT_OK


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return run(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        print("llm-train: interrupted (nothing to save yet)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as e:
        return _fail(str(e))
    except Exception as e:  # engine errors: one line, no traceback
        if _is_known_error(e):
            return _fail(str(e), quiet_on_other_ranks=_decided_on_rank0(e))
        raise


def _is_known_error(e: Exception) -> bool:
    from tritonlm.engine.checkpoint import CheckpointError
    from tritonlm.engine.config import ConfigError
    from tritonlm.engine.data import DataError
    from tritonlm.engine.distributed import DistributedError
    from tritonlm.engine.token_cache import TokenCacheError
    from tritonlm.engine.tokenizer import TokenizerError
    from tritonlm.engine.train import TrainingError

    known = (CheckpointError, ConfigError, DataError, TokenCacheError, TokenizerError)
    return isinstance(e, (*known, TrainingError, DistributedError, ValueError, OSError))


def _decided_on_rank0(e: Exception) -> bool:
    """Training stops (non-finite loss, ...) that every rank raises together."""
    from tritonlm.engine.distributed import DistributedError
    from tritonlm.engine.train import TrainingError

    return isinstance(e, TrainingError) and not isinstance(e, DistributedError)


def _fail(message: str, quiet_on_other_ranks: bool = False) -> int:
    """One line on stderr, exit 2. Under torchrun, prefixed with the rank (rank 0 alone
    reports the errors that all ranks hit together)."""
    from tritonlm.engine.distributed import DistributedError, torchrun_env

    message = " ".join(str(message).split())  # exactly one line
    try:
        env = torchrun_env()
    except DistributedError:
        env = None
    if env is not None and env.world_size > 1:
        if quiet_on_other_ranks and env.rank != 0:
            return EXIT_ERROR
        if not message.startswith("rank "):
            message = f"rank {env.rank} of {env.world_size}: {message}"
    print(f"llm-train: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
