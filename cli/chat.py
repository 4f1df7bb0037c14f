"""llm-chat: talk to a checkpoint (interactive, one prompt, or one answer per input line).

    llm-chat CKPT                          interactive chat (stdin is a terminal)
    llm-chat CKPT --prompt "What is BPE?"  one answer, then exit
    printf 'hi\\nbye\\n' | llm-chat CKPT    one answer per input line (each on its own)
    llm-chat CKPT --raw --prompt "Once"    continue plain text (pretrained-only model)
    llm-chat CKPT --json ...               one JSON object per answer instead of the text

Interactive commands: /help /reset /set KEY VALUE /system TEXT /load PATH /info /exit.
Ctrl-C stops the current answer (the session goes on); Ctrl-D or /exit quits.
Errors (missing or corrupted checkpoint, bad settings) are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from .common import EXIT_INTERRUPTED, Parser, UsageError, report

PROG = "llm-chat"
PROMPT = "you> "

HELP_TEXT = """\
commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /set KEY VALUE     change a sampling setting, e.g. /set temperature 0.7
                     keys: temperature top_k top_p min_p repetition_penalty
                     frequency_penalty presence_penalty max_new_tokens seed
                     stop (adds a stop string; '/set stop none' clears them)
  /set               show the sampling settings
  /system TEXT       set the system prompt (no TEXT: remove it)
  /load PATH         switch to another checkpoint (the conversation stays)
  /info              model size, context length and sampling settings
  /exit              quit (also Ctrl-D); Ctrl-C stops the current answer
  //text             send a message that starts with '/'"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Chat with (or continue text from) a tritonlm checkpoint.",
        epilog=HELP_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (from llm-train)")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument(
        "--raw", action="store_true", help="continue plain text, without the chat template"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    g = p.add_argument_group("sampling (defaults in parentheses)")
    g.add_argument("--temperature", type=float, help="0 = greedy (0.8)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (0.95)")
    g.add_argument("--min-p", type=float, help="drop p < min_p * p(best), in [0, 1) (0)")
    g.add_argument("--repetition-penalty", type=float, help="> 0, 1 = off (1)")
    g.add_argument("--frequency-penalty", type=float, help="per repeat in the answer (0)")
    g.add_argument("--presence-penalty", type=float, help="once per token in the answer (0)")
    g.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (256)")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling (random)")
    g.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)"
    )
    g2 = p.add_argument_group("hardware")
    g2.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    g2.add_argument(
        "--backend", default="auto", choices=("auto", "torch", "triton"), help="kernels (auto)"
    )
    return p


def sampling_from_args(args: argparse.Namespace):
    """SamplingConfig from the options that were given (the rest keep their defaults)."""
    from tritonlm.engine.sampling import SamplingConfig, SamplingError

    names = (
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "max_new_tokens",
        "seed",
    )
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        return SamplingConfig(**given, stop=tuple(args.stop))
    except SamplingError as e:
        raise UsageError(str(e)) from None


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_backend(backend: str, device) -> None:
    from tritonlm.kernels.dispatch import check_backend as check

    try:
        check(backend, device)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------- session


@dataclass
class Session:
    """Everything the chat loop keeps between answers."""

    checkpoint: object  # engine.checkpoint.Checkpoint
    sampling: object  # engine.sampling.SamplingConfig
    raw: bool = False
    as_json: bool = False
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    device: object = None
    backend: str = "auto"

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    def messages(self, user_text: str, history: bool = True) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        past = self.history if history else []
        return msgs + past + [{"role": "user", "content": user_text}]


def load(path: str, device, backend: str):
    """Load a checkpoint; errors become UsageError with the engine's one-line message."""
    from tritonlm.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, device=device, backend=backend)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def prompt_ids(session: Session, text: str, history: bool) -> tuple[list[int], int, int]:
    """Token ids for one user message (with history when ``history``): (ids, messages
    dropped to fit the context, tokens cut from a message longer than the context)."""
    from tritonlm.engine.generate import build_chat_prompt, encode_raw_prompt

    tok = session.tokenizer
    if session.raw:
        return encode_raw_prompt(tok, text), 0, 0
    ctx = session.model.config.max_seq_len
    room = min(session.sampling.max_new_tokens, max(1, ctx // 4))
    chat = build_chat_prompt(tok, session.messages(text, history), max_tokens=ctx - room)
    return chat.ids, chat.dropped, chat.cut_tokens


def answer(session: Session, text: str, out, err, history: bool) -> None:
    """Generate one answer, streaming it to ``out`` (or printing JSON); update the history.

    Ctrl-C during generation stops the answer; the part already printed is kept.
    """
    from tritonlm.engine.generate import stream

    ids, dropped, cut = prompt_ids(session, text, history)
    s = stream(session.model, session.tokenizer, ids, session.sampling)
    interrupted = False
    try:
        for piece in s:
            if not session.as_json and piece.text:
                out.write(piece.text)
                out.flush()
    except KeyboardInterrupt:
        s.close()
        interrupted = True
    result = s.result
    if cut:
        result.prompt_truncated += cut
        result.warnings.append(
            f"the message is longer than the context: its first {cut} tokens were left out"
        )
    if session.as_json:
        record = {
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "new_tokens": result.new_tokens,
            "tokens_per_s": round(result.tokens_per_s, 3),
            "time_to_first_token_s": round(result.time_to_first_token_s, 6),
            "stop_reason": result.stop_reason,
            "prompt_truncated": result.prompt_truncated,
            "dropped_messages": dropped,
            "warnings": result.warnings,
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write("\n")
        for w in result.warnings:
            err.write(f"{PROG}: warning: {w}\n")
        if dropped:
            err.write(f"{PROG}: note: dropped the {dropped} oldest message(s) to fit the context\n")
        if interrupted:
            err.write(f"{PROG}: [answer stopped]\n")
    out.flush()
    err.flush()
    if history and not session.raw and (result.text or not interrupted):
        session.history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": result.text},
        ]


def info_text(session: Session) -> str:
    cfg = session.model.config
    n = session.model.num_parameters()
    lines = [
        f"checkpoint   {session.checkpoint.path}",
        f"parameters   {n:,} ({n / 1e6:.2f}M)",
        f"shape        d_model {cfg.d_model}, layers {cfg.n_layers}, heads {cfg.n_heads}, "
        f"d_ff {cfg.d_ff}",
        f"context      {cfg.max_seq_len} tokens",
        f"vocabulary   {session.tokenizer.vocab_size} tokens",
        f"device       {session.device} (backend {session.backend})",
        f"mode         {'raw text' if session.raw else 'chat'}; "
        f"{len(session.history)} message(s) in history",
        f"system       {session.system!r}",
        "sampling     " + settings_text(session.sampling),
    ]
    return "\n".join(lines)


def settings_text(sampling) -> str:
    return " ".join(f"{k}={v!r}" for k, v in sampling.to_dict().items())


def run_command(session: Session, line: str, out) -> bool:
    """Handle one slash command; return False when the session should end."""
    from tritonlm.engine.sampling import SamplingError, parse_setting

    cmd, _, rest = line[1:].partition(" ")
    cmd, rest = cmd.lower(), rest.strip()
    if cmd in ("exit", "quit"):
        return False
    if cmd == "help":
        out.write(HELP_TEXT + "\n")
    elif cmd == "reset":
        session.history.clear()
        out.write("(conversation cleared)\n")
    elif cmd == "set":
        if not rest:
            out.write(settings_text(session.sampling) + "\n")
            return True
        key, _, value = rest.partition(" ")
        try:
            session.sampling = parse_setting(session.sampling, key, value.strip())
        except SamplingError as e:
            out.write(f"error: {e}\n")
        else:
            out.write(f"(set {key} = {value.strip()})\n")
    elif cmd == "system":
        session.system = rest or None
        out.write("(system prompt set)\n" if rest else "(system prompt removed)\n")
    elif cmd == "load":
        if not rest:
            out.write("error: /load needs a checkpoint path\n")
            return True
        try:
            ckpt = load(os.path.expanduser(rest), session.device, session.backend)
        except UsageError as e:
            out.write(f"error: {e}\n")
        else:
            session.checkpoint = ckpt
            out.write(f"(loaded {ckpt.path}: {ckpt.model.num_parameters():,} parameters)\n")
    elif cmd == "info":
        out.write(info_text(session) + "\n")
    else:
        out.write(f"error: unknown command /{cmd}; /help lists the commands\n")
    return True


def interactive(session: Session, out, err) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.write(
        f"{PROG}: {session.checkpoint.path} ({session.model.num_parameters():,} parameters, "
        f"context {session.model.config.max_seq_len}). /help for commands, Ctrl-D to quit.\n"
    )
    out.flush()
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, keep going
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not run_command(session, line, out):
                return 0
            out.flush()
            continue
        if line.startswith("//"):
            line = line[1:]
        try:
            answer(session, line, out, err, history=True)
        except KeyboardInterrupt:  # a Ctrl-C that lands outside the token loop
            out.write("\n")
            out.flush()


def main(argv: list[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
        sampling = sampling_from_args(args)
        device = resolve_device(args.device)
        check_backend(args.backend, device)
        ckpt = load(args.checkpoint, device, args.backend)
        session = Session(
            checkpoint=ckpt,
            sampling=sampling,
            raw=args.raw,
            as_json=args.json,
            system=args.system,
            device=device,
            backend=args.backend,
        )
        if args.prompt is not None:
            answer(session, args.prompt, out, err, history=False)
            return 0
        if not sys.stdin.isatty():
            for line in sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    answer(session, line, out, err, history=False)
            return 0
        return interactive(session, out, err)
    except UsageError as e:
        return report(PROG, e, file=err)
    except KeyboardInterrupt:
        err.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): stop quietly
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
