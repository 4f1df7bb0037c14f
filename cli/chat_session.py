"""llm-chat's session: the conversation, the settings, one answer, the slash commands.

Everything here works on plain objects and text streams, so tests drive it without a
terminal or argparse; cli/chat.py decides where the lines come from and go to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .common import UsageError, user_message

PROG = "llm-chat"

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
  //text             send a message that starts with '/'
piped input gets the same commands; what they print goes to stderr"""


def is_utf8(text: str) -> bool:
    """False for text decoded with surrogate escapes (bad bytes from argv or a terminal)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8(what: str, text: str | None) -> None:
    if text is not None and not is_utf8(text):
        raise UsageError(f"{what}: not valid UTF-8 (check the terminal's encoding)")


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
    weights: str = "fp32"  # or "int8" (weight-only, see engine/model/int8.py)
    decode: str = "eager"  # the decode step: eager, compile or graphs (cuda_graphs.py)
    decoder: object = None  # built at the first answer, for the current checkpoint

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


def load(path: str, device, backend: str, weights: str = "fp32", compiled: bool = False):
    """Load a checkpoint prepared for decoding (engine.model.inference_weights: int8 block
    matrices when ``weights`` is "int8"); errors become UsageError with the engine's
    one-line message."""
    from tritonlm.engine.checkpoint.checkpoint_files import CheckpointError
    from tritonlm.engine.lora.adapter_checkpoint import load_model
    from tritonlm.engine.model.inference_weights import prepare_inference_weights

    try:  # an adapter checkpoint comes merged into its base
        ckpt = load_model(path, device=device, backend=backend)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(user_message(e)) from None
    prepare_inference_weights(ckpt.model, weights, compiled=compiled)  # CPU: column-major
    return ckpt


def decoder(session: Session, err):
    """The session's decode step over one preallocated cache (rebuilt after /load); a CUDA
    graph capture that fails prints one line on ``err`` and the chat goes on eagerly."""
    from tritonlm.engine.model.cuda_graphs import make_decode_step

    model = session.model
    if session.decoder is None or session.decoder.model is not model:
        cache = model.new_cache(1, max_len=model.config.max_seq_len)
        session.decoder = make_decode_step(
            model, cache, session.decode, lambda line: err.write(f"{PROG}: note: {line}\n")
        )
    return session.decoder


def prompt_ids(session: Session, text: str, history: bool) -> tuple[list[int], int, int]:
    """Token ids for one user message (with history when ``history``): (ids, messages
    dropped to fit the context, tokens cut from a message longer than the context)."""
    from tritonlm.engine.inference.chat_prompt import (
        build_chat_prompt,
        encode_raw_prompt,
        history_budget,
    )

    tok = session.tokenizer
    if session.raw:
        return encode_raw_prompt(tok, text), 0, 0
    budget = history_budget(session.model.config.max_seq_len, session.sampling.max_new_tokens)
    chat = build_chat_prompt(tok, session.messages(text, history), max_tokens=budget)
    return chat.ids, chat.dropped, chat.cut_tokens


def answer(session: Session, text: str, out, err, history: bool) -> None:
    """Generate one answer, streaming it to ``out`` (or printing JSON); update the history.

    Ctrl-C during generation stops the answer; the part already printed is kept.
    """
    from tritonlm.engine.inference.generate import stream

    ids, dropped, cut = prompt_ids(session, text, history)
    step = decoder(session, err)
    s = stream(session.model, session.tokenizer, ids, session.sampling, decoder=step)
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


class CommandError(Exception):
    """A slash command that cannot be done: a bad value, an unknown command, ..."""


def run_command(session: Session, line: str, out) -> bool:
    """Interactive: do one slash command; a failing one prints 'error: ...' and the session
    goes on. Return False when the session should end."""
    try:
        return command(session, line, out)
    except CommandError as e:
        out.write(f"error: {e}\n")
        return True


def command(session: Session, line: str, out) -> bool:
    """Do one slash command, writing what it says to ``out``; False for /exit.

    Raises CommandError for a bad value or an unknown command (pipe mode stops on it).
    """
    from tritonlm.engine.inference.sampling import parse_setting

    cmd, _, rest = line[1:].partition(" ")
    cmd, rest = cmd.lower(), rest.strip()
    if cmd in ("exit", "quit"):
        return False
    if cmd == "help":
        out.write(HELP_TEXT + "\n")
    elif cmd == "reset":
        session.history.clear()
        out.write("(conversation cleared)\n")
    elif cmd == "set" and not rest:
        out.write(settings_text(session.sampling) + "\n")
    elif cmd == "set":
        key, _, value = rest.partition(" ")
        try:
            new = parse_setting(session.sampling, key, value.strip())
        except ValueError as e:  # SamplingError or a limit
            raise CommandError(str(e)) from None
        session.sampling = new
        out.write(f"(set {key} = {value.strip()})\n")
    elif cmd == "system":
        session.system = rest or None
        out.write("(system prompt set)\n" if rest else "(system prompt removed)\n")
    elif cmd == "load":
        if not rest:
            raise CommandError("/load needs a checkpoint path")
        try:
            ckpt = load(os.path.expanduser(rest), session.device, session.backend, session.weights,
                        session.decode == "compile")  # fmt: skip
        except UsageError as e:
            raise CommandError(str(e)) from None
        session.checkpoint = ckpt
        out.write(f"(loaded {ckpt.path}: {ckpt.model.num_parameters():,} parameters)\n")
    elif cmd == "info":
        out.write(info_text(session) + "\n")
    else:
        raise CommandError(f"unknown command /{cmd}; /help lists the commands")
    return True
