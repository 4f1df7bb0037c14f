"""llm-chat: one prompt, JSON, errors, a pipe, and an interactive session on a pseudo-terminal.

The checkpoint is trained in chat_fixtures.py (a tiny model memorizes three one-turn
chats), so greedy answers are known: "hi" -> "hello there, friend.".
"""

import fcntl
import json
import os
import select
import shutil
import subprocess
import termios
import time
from pathlib import Path

import pytest
import torch
from chat_fixtures import CHATS, LLM_CHAT, TIMEOUT, Sink, trained_checkpoint
from factories import run_cli
from tritonlm.cli import chat
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model import decode_step


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


# ----------------------------------------------------------------------------- one-shot


def test_prompt_prints_the_answer(ckpt, capsys):
    for user, want in CHATS:
        rc, out, err = run_cli(chat.main, capsys, ckpt, "--prompt", user, "--temperature", "0")
        assert rc == 0 and out == want + "\n" and err == ""


def test_json_output(ckpt, capsys):
    rc, out, _ = run_cli(chat.main, capsys, ckpt, "--prompt", "hi", "--temperature", "0", "--json")
    assert rc == 0
    record = json.loads(out)
    assert record["text"] == "hello there, friend."
    assert record["stop_reason"] == "end"
    assert record["prompt_tokens"] > 0 and record["new_tokens"] > 0
    assert record["tokens_per_s"] > 0
    assert set(record) >= {"text", "prompt_tokens", "new_tokens", "tokens_per_s", "stop_reason"}


def test_stop_string_and_max_new_tokens_options(ckpt, capsys):
    rc, out, _ = run_cli(
        chat.main, capsys, ckpt, "--prompt", "hi", "--temperature", "0", "--stop", "there", "--json"
    )
    record = json.loads(out)
    assert rc == 0 and record["text"] == "hello " and record["stop_reason"] == "stop_string"
    rc, out, _ = run_cli(
        chat.main,
        capsys,
        ckpt,
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert json.loads(out)["new_tokens"] == 2 and json.loads(out)["stop_reason"] == "max_new_tokens"


def test_sampling_options_and_seed(ckpt, capsys):
    args = [ckpt, "--prompt", "what is a token?", "--json", "--seed", "5", "--temperature", "1.3"]
    args += ["--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1"]
    args += ["--frequency-penalty", "0.1", "--presence-penalty", "0.1", "--device", "cpu"]
    args += ["--backend", "torch", "--system", "be nice"]
    rc1, out1, _ = run_cli(chat.main, capsys, *args)
    rc2, out2, _ = run_cli(chat.main, capsys, *args)
    assert rc1 == rc2 == 0
    assert json.loads(out1)["text"] == json.loads(out2)["text"]


def test_raw_mode_continues_text(ckpt, capsys):
    rc, out, _ = run_cli(
        chat.main, capsys, ckpt, "--raw", "--prompt", "hello", "--temperature", "0", "--json"
    )
    record = json.loads(out)
    assert rc == 0 and record["new_tokens"] > 0
    # raw prompt = <|bos|> + the text's tokens, no chat template
    tok = load_checkpoint(ckpt).tokenizer
    assert record["prompt_tokens"] == 1 + len(tok.encode("hello"))


# ----------------------------------------------------------------------------- errors


def one_line_error(rc, out, err, *words):
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llm-chat: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_missing_checkpoint(tmp_path, capsys):
    one_line_error(
        *run_cli(chat.main, capsys, tmp_path / "nope", "--prompt", "hi"), "does not exist"
    )


def test_corrupted_checkpoint(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    one_line_error(*run_cli(chat.main, capsys, bad, "--prompt", "hi"), "model.safetensors")


@pytest.mark.parametrize(
    "args, word",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--min-p", "1"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--seed", "-1"], "--seed"),
        (["--temperature", "warm"], "--temperature"),
        (["--bogus"], "--bogus"),
        (["--backend", "cuda"], "--backend"),
        (["--device", "cuda:7"], "cuda"),
        (["--device", "meta"], "unsupported device"),
        (["--stop", ""], "stop"),
    ],
)
def test_bad_options_one_line(ckpt, capsys, args, word):
    one_line_error(*run_cli(chat.main, capsys, ckpt, "--prompt", "hi", *args), word)


def test_triton_backend_on_cpu_without_interpreter(ckpt, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = run_cli(
        chat.main, capsys, ckpt, "--prompt", "hi", "--backend", "triton", "--device", "cpu"
    )
    one_line_error(*result, "TRITON_INTERPRET=1")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        chat.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--prompt", "--raw", "--json", "--stop", "--min-p", "/set KEY VALUE"):
        assert opt in out


# ----------------------------------------------------------------------------- session logic


def make_session(ckpt, **kw):
    return chat.Session(
        checkpoint=chat.load(str(ckpt), torch.device("cpu"), "torch"),
        sampling=SamplingConfig(temperature=0),
        device=torch.device("cpu"),
        backend="torch",
        **kw,
    )


def test_slash_commands(ckpt, tmp_path):
    s = make_session(ckpt)
    out = Sink()
    assert chat.run_command(s, "/set temperature 0.5", out)
    assert s.sampling.temperature == 0.5
    assert chat.run_command(s, "/set top-k 7", out) and s.sampling.top_k == 7
    assert chat.run_command(s, "/set top_p 3", out) and "error: top_p" in out.text
    assert s.sampling.top_p == 1.0
    assert chat.run_command(s, "/set stop ###", out) and s.sampling.stop == ("###",)
    assert chat.run_command(s, "/system be brief", out) and s.system == "be brief"
    assert chat.run_command(s, "/info", out)
    for word in ("parameters", "context      64", "temperature=0.5", "be brief"):
        assert word in out.text
    s.history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert chat.run_command(s, "/reset", out) and s.history == []
    assert chat.run_command(s, "/help", out) and "/load PATH" in out.text
    assert chat.run_command(s, "/frobnicate", out) and "unknown command" in out.text
    assert chat.run_command(s, f"/load {tmp_path / 'missing'}", out)
    assert "error:" in out.text and s.checkpoint.path == Path(ckpt)
    assert chat.run_command(s, f"/load {ckpt}", out) and "(loaded" in out.text
    assert not chat.run_command(s, "/exit", out)
    assert not chat.run_command(s, "/quit", out)


def test_history_multi_turn_and_ctrl_c_mid_answer(ckpt):
    s = make_session(ckpt)
    out, err = Sink(), Sink()
    chat.answer(s, "hi", out, err, history=True)
    assert out.text == "hello there, friend.\n"
    assert s.history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there, friend."},
    ]
    # the second prompt contains the first turn
    ids, dropped, cut = chat.prompt_ids(s, "bye", history=True)
    first = s.tokenizer.render_chat(s.history, add_generation_prompt=False)[0]
    assert ids[: len(first)] == first and dropped == 0

    # Ctrl-C after 3 tokens: the answer stops, what was printed stays, the session goes on
    real, calls = decode_step.decode_logits, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 3:  # the prefill and 2 decode steps gave 3 tokens
            raise KeyboardInterrupt
        return real(*args)

    decode_step.decode_logits = interrupting
    try:
        out2 = Sink()
        chat.answer(s, "what is a token?", out2, err, history=True)
    finally:
        decode_step.decode_logits = real
    assert "[answer stopped]" in err.text
    partial = out2.text.rstrip("\n")
    assert 0 < len(partial) < len("a piece of text.")
    assert s.history[-1] == {"role": "assistant", "content": partial}


def test_history_is_truncated_to_fit_context(ckpt):
    s = make_session(ckpt, system="sys")
    s.sampling = SamplingConfig(temperature=0, max_new_tokens=8)
    for i in range(20):
        s.history += [
            {"role": "user", "content": f"question number {i}"},
            {"role": "assistant", "content": f"answer number {i}"},
        ]
    ids, dropped, cut = chat.prompt_ids(s, "hi", history=True)
    assert dropped > 0 and cut == 0 and len(ids) <= 64 - 8
    assert ids[:2] == [s.tokenizer.bos_id, s.tokenizer.system_id]
    out, err = Sink(), Sink()
    chat.answer(s, "hi", out, err, history=True)
    assert "dropped" in err.text


# ----------------------------------------------------------------------------- subprocesses


def child_env():
    env = dict(os.environ)
    env["TERM"] = "dumb"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_pipe_answers_each_line(ckpt):
    proc = subprocess.run(
        [str(LLM_CHAT), str(ckpt), "--temperature", "0"],
        input="hi\n\nbye\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello there, friend.\ngoodbye! ünïcode ✓\n"

    proc = subprocess.run(
        [str(LLM_CHAT), str(ckpt), "--temperature", "0", "--json"],
        input="hi\nwhat is a token?\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        env=child_env(),
    )
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in records] == ["hello there, friend.", "a piece of text."]


class Pty:
    """llm-chat on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, *args):
        self.master, slave = os.openpty()

        def become_tty_owner():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [str(LLM_CHAT), *map(str, args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=child_env(),
            preexec_fn=become_tty_owner,
            close_fds=True,
        )
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = TIMEOUT) -> str:
        """Read until ``marker`` appears; return the text before it (and consume it)."""
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {marker!r}; got {self.buffer!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    assert self.proc.poll() is not None
                    assert marker in self.buffer, f"exited; got {self.buffer!r}"
                    break
                self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        before, _, self.buffer = self.buffer.partition(marker)
        return before

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        os.close(self.master)


def test_interactive_session_on_a_pty(ckpt):
    term = Pty(ckpt, "--temperature", "0")
    try:
        banner = term.read_until(chat.PROMPT)
        assert "parameters" in banner and "/help" in banner
        term.send("hi\n")
        assert "hello there, friend." in term.read_until(chat.PROMPT)
        term.send("/info\n")
        info = term.read_until(chat.PROMPT)
        assert "parameters" in info and "context      64" in info and "temperature=0" in info
        term.send("/set temperature 0.5\n")
        assert "(set temperature = 0.5)" in term.read_until(chat.PROMPT)
        term.send("/info\n")
        assert "temperature=0.5" in term.read_until(chat.PROMPT)
        term.send("/set temperature 0\n")
        term.read_until(chat.PROMPT)
        term.send("/reset\n")
        assert "(conversation cleared)" in term.read_until(chat.PROMPT)
        # Ctrl-C (at the prompt or during an answer) keeps the session alive
        term.send("bye\n")
        time.sleep(0.05)
        term.send("\x03")
        # A late ^C may also cancel the next typed line (as in any shell), so probe until a
        # command gets through: the session must still be alive and working.
        for attempt in range(3):
            term.send("/reset\n")
            try:
                term.read_until("(conversation cleared)", timeout=15 * (attempt + 1))
                break
            except AssertionError:
                assert term.proc.poll() is None, "llm-chat exited on Ctrl-C"
        else:
            raise AssertionError(f"no response after Ctrl-C: {term.buffer!r}")
        term.read_until(chat.PROMPT)
        while term.proc.poll() is None and chat.PROMPT in term.buffer:  # extra prompts
            term.read_until(chat.PROMPT)
        term.send("what is a token?\n")
        assert "a piece of text." in term.read_until(chat.PROMPT)
        term.send("\x04")  # Ctrl-D quits
        assert term.proc.wait(timeout=TIMEOUT) == 0
    finally:
        term.close()


def test_exit_command_on_a_pty(ckpt):
    term = Pty(ckpt, "--temperature", "0", "--json")
    try:
        term.read_until(chat.PROMPT)
        term.send("hi\n")
        line = term.read_until(chat.PROMPT).strip().splitlines()[-1]
        assert json.loads(line)["text"] == "hello there, friend."
        term.send("/exit\n")
        assert term.proc.wait(timeout=TIMEOUT) == 0
    finally:
        term.close()
