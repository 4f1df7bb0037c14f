"""llm-chat: talk to a checkpoint (interactive, one prompt, or one answer per input line).

    llm-chat CKPT                          interactive chat (stdin is a terminal)
    llm-chat CKPT --prompt "What is BPE?"  one answer, then exit
    printf 'hi\\nbye\\n' | llm-chat CKPT    one answer per input line (each on its own);
                                           slash commands work there too (output on stderr)
    llm-chat CKPT --raw --prompt "Once"    continue plain text (pretrained-only model)
    llm-chat CKPT --json ...               one JSON object per answer instead of the text

Interactive commands: /help /reset /set KEY VALUE /system TEXT /load PATH /info /exit.
Ctrl-C stops the current answer (the session goes on); Ctrl-D or /exit quits.
Errors (missing or corrupted checkpoint, bad settings) are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from tritonlm.engine.errors import os_reason

from .chat_session import (
    HELP_TEXT,
    PROG,
    CommandError,
    Session,
    answer,
    check_utf8,
    command,
    info_text,
    is_utf8,
    load,
    prompt_ids,
    run_command,
    settings_text,
)
from .common import (
    EXIT_INTERRUPTED,
    Parser,
    UsageError,
    add_config_flags,
    config_values,
    report,
    user_message,
)
from .device import add_device_flags, device_and_backend
from .threads_flag import add_threads_flag, apply_threads

__all__ = ["CommandError", "Session", "answer", "command", "info_text", "load", "main",
           "pipe", "prompt_ids", "run_command", "settings_text"]  # fmt: skip

PROMPT = "you> "


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
    from tritonlm.engine.inference.sampling import SamplingConfig

    g = p.add_argument_group("sampling")
    add_config_flags(g, SamplingConfig)  # flags, help, defaults and checks from its fields
    g.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)"
    )
    g2 = p.add_argument_group("hardware")
    add_device_flags(g2)
    add_threads_flag(g2)
    g2.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                    help="int8: weight-only int8 matrices and output projection (smaller; "
                         "fastest with --compile; see README)")  # fmt: skip
    g2.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (compiled at the first answer)",
    )
    g2.add_argument("--no-graphs", action="store_true",
                    help="on CUDA, do not capture the decode step as CUDA graphs")  # fmt: skip
    return p


def sampling_from_args(args: argparse.Namespace):
    """SamplingConfig from the sampling flags (each already checked by its field)."""
    from tritonlm.engine.inference.sampling import SamplingConfig, SamplingError

    try:
        return SamplingConfig(**config_values(args, SamplingConfig), stop=tuple(args.stop))
    except SamplingError as e:  # a rule across fields (e.g. a tiny temperature)
        raise UsageError(user_message(e)) from None


# ----------------------------------------------------------------------------- modes


def pipe(session: Session, lines, out, err) -> int:
    """Pipe mode: one answer per message line (each on its own, no history), and the same
    slash commands as interactive mode. What a command says goes to ``err``, so ``out``
    holds only the answers (one JSON object each with --json). A line that is not UTF-8
    or a command that fails ends the run with one error line (exit 2)."""
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            at = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
            raise UsageError(f"stdin line {number}: not valid UTF-8 ({at})") from None
        check_utf8(f"stdin line {number}", line)
        line = line.rstrip("\r\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            try:
                if not command(session, text, err):
                    return 0
            except CommandError as e:
                name = text.split()[0]
                said = str(e) if name in str(e) else f"{name}: {e}"
                raise UsageError(f"stdin line {number}: {said}") from None
            err.flush()
            continue
        answer(session, text[1:] if text.startswith("//") else line, out, err, history=False)
    return 0


def stdin_lines(stream):
    """The lines of stdin as bytes (decoded one at a time by `pipe`); read errors are
    UsageErrors. Lines are read as they come, so a slow producer is answered at once."""
    source = getattr(stream, "buffer", stream)
    while True:
        try:
            line = source.readline()
        except OSError as e:
            raise UsageError(f"cannot read stdin: {os_reason(e)}") from None
        if not line:
            return
        yield line


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
        except UnicodeDecodeError:  # a strict terminal encoding
            line = None
        if line is None or not is_utf8(line):  # or one that escapes bad bytes
            out.write("error: this line is not valid UTF-8 (check the terminal's encoding)\n")
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
        for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
            check_utf8(flag, text)
        for text in args.stop:
            check_utf8("--stop", text)
        if not args.checkpoint:  # Path("") would be the current folder
            raise UsageError("CKPT is an empty path: give a checkpoint directory")
        sampling = sampling_from_args(args)
        device = device_and_backend(args)
        apply_threads(args)
        ckpt = load(args.checkpoint, device, args.backend, args.weights, args.compile)
        from tritonlm.engine.model.cuda_graphs import pick_decode_mode

        if not args.raw and ckpt.tokenizer.config.chat_template == "none":
            raise UsageError(
                "this model's tokenizer has no chat template we can render (an imported "
                "model); use --raw to continue plain text"
            )
        session = Session(
            checkpoint=ckpt,
            sampling=sampling,
            raw=args.raw,
            as_json=args.json,
            system=args.system,
            device=device,
            backend=args.backend,
            weights=args.weights,
            decode=pick_decode_mode(device, graphs=not args.no_graphs, compile=args.compile),
        )
        if args.prompt is not None:
            answer(session, args.prompt, out, err, history=False)
            return 0
        if sys.stdin is None:  # started with stdin closed
            raise UsageError("stdin is closed: give --prompt TEXT or pipe messages in")
        if not sys.stdin.isatty():
            return pipe(session, stdin_lines(sys.stdin), out, err)
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
