"""llm-chat input: every flag with bad values, and slash commands in pipe mode.

Bad input is exactly one line `llm-chat: error: ...` on stderr and exit 2, before any
answer; in pipe mode the commands work as in interactive mode and their output goes to
stderr, so stdout holds only the answers.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from chat_fixtures import LLM_CHAT, TIMEOUT, Sink, trained_checkpoint
from tritonlm.cli import chat
from tritonlm.cli.common import UsageError
from tritonlm.engine.inference.sampling import SamplingConfig

SEED_MAX = str(2**64 - 1)  # the largest seed torch takes, as the messages print it


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


def one_line_error(capsys, argv, *words):
    rc = chat.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith("llm-chat: error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


BAD_UTF8 = "caf\udce9"  # how Python hands over the bytes b"caf\xe9" from argv
# flag -> [(value(s) after the flag, a word the error line must hold)]; None = no value
BAD_FLAGS = {
    "--prompt": [(None, "--prompt"), (BAD_UTF8, "not valid UTF-8")],
    "--system": [(None, "--system"), (BAD_UTF8, "not valid UTF-8")],
    "--raw": [("=yes", "--raw")],
    "--json": [("=1", "--json")],
    "--temperature": [("warm", "--temperature"), ("-1", "--temperature"), ("nan", "finite"),
                      ("inf", "finite"), ("1e400", "finite"), ("1e-40", "1e-06"),
                      ("1e7", "1e+06"), ("", "--temperature"), (None, "--temperature")],
    "--top-k": [("1.5", "--top-k"), ("-2", "--top-k"), ("x", "--top-k"), ("", "--top-k")],
    "--top-p": [("0", "--top-p"), ("1.5", "--top-p"), ("nan", "--top-p"), ("-0.1", "--top-p")],
    "--min-p": [("1", "--min-p"), ("-0.5", "--min-p"), ("nan", "--min-p"), ("x", "--min-p")],
    "--repetition-penalty": [("0", "--repetition-penalty"), ("-1", "--repetition-penalty"),
                             ("1e-320", "1e-06"), ("1e308", "1e+06"), ("inf", "finite")],
    "--frequency-penalty": [("1e308", "1e+06"), ("nan", "finite"), ("=-1e7", "1e+06"),
                            ("x", "--frequency-penalty")],
    "--presence-penalty": [("inf", "finite"), ("=-1e9", "1e+06"), ("x", "--presence-penalty")],
    "--max-new-tokens": [("0", "--max-new-tokens"), ("-5", "--max-new-tokens"),
                         ("1e9", "--max-new-tokens"), ("x", "--max-new-tokens")],
    "--seed": [("-1", "--seed"), (str(2**64), SEED_MAX), (str(2**64 + 1), SEED_MAX),
               (str(10**30), SEED_MAX), ("1.5", "--seed"), ("1e3", "--seed"),
               ("x", "--seed"), ("", "--seed"), ("0x10", "--seed"), (None, "--seed")],
    "--stop": [("", "stop"), (BAD_UTF8, "not valid UTF-8"), (None, "--stop")],
    "--device": [("meta", "unsupported device"), ("", "unknown device"), ("cpu:5", "cpu:5"),
                 ("gpu", "unknown device"), ("cuda:-1", "cuda:-1"), ("cuda:abc", "cuda:abc"),
                 ("cuda:7", "cuda")],
    "--backend": [("cuda", "--backend"), ("", "--backend"), ("TORCH", "--backend")],
    "--bogus": [(None, "--bogus")],
    "--tempurature": [("0", "--tempurature")],
}  # fmt: skip
CASES = [(flag, value, word) for flag, cases in BAD_FLAGS.items() for value, word in cases]


@pytest.mark.parametrize("flag, value, word", CASES)
def test_every_flag_refuses_bad_values_in_one_line(ckpt, capsys, flag, value, word):
    if value is None:
        args = [flag]  # the value is missing (the flag comes last)
    elif value.startswith("="):
        args = [flag + value]
    else:
        args = [flag, value]
    prompt = [] if flag == "--prompt" else ["--prompt", "hi"]
    one_line_error(capsys, [ckpt, *prompt, *args], word)


@pytest.mark.parametrize(
    "checkpoint, word",
    [("", "empty path"), ("/dev/null", "/dev/null"), ("missing-dir", "does not exist")],
)
def test_bad_checkpoint_argument(tmp_path, capsys, checkpoint, word):
    path = str(tmp_path / checkpoint) if checkpoint == "missing-dir" else checkpoint
    one_line_error(capsys, [path, "--prompt", "hi"], word)


def test_checkpoint_that_is_a_fifo(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    one_line_error(capsys, [tmp_path / "fifo", "--prompt", "hi"], "fifo")


def test_largest_seed_works(ckpt, capsys):
    rc = chat.main([str(ckpt), "--prompt", "hi", "--seed", str(2**64 - 1), "--max-new-tokens", "2"])
    assert rc == 0 and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- pipe mode


def session(ckpt, **kw):
    return chat.Session(
        checkpoint=chat.load(str(ckpt), torch.device("cpu"), "torch"),
        sampling=SamplingConfig(temperature=0.8, seed=1),
        device=torch.device("cpu"),
        backend="torch",
        **kw,
    )


def test_pipe_runs_commands_and_messages(ckpt):
    s, out, err = session(ckpt), Sink(), Sink()
    lines = [
        "/set temperature 0\n",
        b"hi\n",  # stdin lines arrive as bytes
        "\n",
        "  /info  \n",
        "/set max_new_tokens 2\n",
        "/set\n",
        "bye\n",
        "/set max-new-tokens 256\n",
        "/system be brief\n",
        "/reset\n",
        "/help\n",
        "what is a token?\r\n",
        "//not a command\n",
        "/exit\n",
        "never answered\n",
    ]
    assert chat.pipe(s, iter(lines), out, err) == 0
    answers = out.text.splitlines()
    assert answers[0] == "hello there, friend." and answers[2] == "a piece of text."
    assert len(answers) == 4  # hi, bye (2 tokens), what is a token?, /not a command
    assert len(s.tokenizer.encode(answers[1])) <= 2
    for said in ("(set temperature = 0)", "context      64", "max_new_tokens=2",
                 "(system prompt set)", "(conversation cleared)", "/load PATH"):  # fmt: skip
        assert said in err.text and said not in out.text
    assert s.system == "be brief" and s.sampling.temperature == 0 and s.history == []


PIPE_ERRORS = {
    "bad value": ("/set top_p 3", "stdin line 2: /set: top_p"),
    "unknown key": ("/set warmth 1", "unknown setting 'warmth'"),
    "no number": ("/set temperature hot", "cannot parse 'hot'"),
    "negative seed": ("/set seed -1", "seed"),
    "huge seed": (f"/set seed {2**64}", SEED_MAX),
    "tiny temperature": ("/set temperature 1e-30", "1e-06"),
    "huge penalty": ("/set frequency_penalty 1e300", "1e+06"),
    "empty stop": ("/set stop", None),  # clears the stop strings: not an error
    "unknown command": ("/frobnicate", "stdin line 2: unknown command /frobnicate"),
    "load nothing": ("/load", "stdin line 2: /load needs a checkpoint path"),
    "load missing": ("/load /no/such/ckpt", "/no/such/ckpt"),
    "not utf-8": (b"caf\xe9", "stdin line 2: not valid UTF-8 (byte 0xe9 at column 4)"),
    "escaped bytes": ("caf\udce9", "stdin line 2: not valid UTF-8"),
}


@pytest.mark.parametrize("name", sorted(PIPE_ERRORS))
def test_pipe_stops_at_a_bad_line(ckpt, name):
    line, words = PIPE_ERRORS[name]
    s, out, err = session(ckpt), Sink(), Sink()
    before = s.sampling
    lines = iter(["/set max_new_tokens 2\n", line, "/set max_new_tokens 3\n"])
    if words is None:
        assert chat.pipe(s, lines, out, err) == 0 and s.sampling.stop == ()
        return
    with pytest.raises(UsageError) as info:
        chat.pipe(s, lines, out, err)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert s.sampling.max_new_tokens == 2 and s.sampling.temperature == before.temperature
    assert next(lines) == "/set max_new_tokens 3\n"  # nothing read after the bad line


def test_interactive_set_keeps_the_old_value_on_error(ckpt):
    s, out = session(ckpt), Sink()
    for bad in (f"/set seed {2**64}", "/set temperature 1e-9", "/set presence_penalty -1e9"):
        assert chat.run_command(s, bad, out)
    assert out.text.count("error: ") == 3 and s.sampling.seed == 1


def run_pipe(ckpt, text: bytes, *flags):
    return subprocess.run(
        [str(LLM_CHAT), str(ckpt), *flags],
        input=text,
        capture_output=True,
        timeout=TIMEOUT * 2,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_piped_commands_through_the_installed_script(ckpt):
    text = "/set temperature 0\nhi\n/info\n/set max_new_tokens 1\nbye\n/reset\n/exit\nhi\n"
    proc = run_pipe(ckpt, text.encode(), "--json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert records[0]["text"] == "hello there, friend." and len(records) == 2
    assert records[1]["new_tokens"] == 1
    err = proc.stderr.decode()
    assert "(set temperature = 0)" in err and "parameters" in err and "cleared" in err


@pytest.mark.parametrize(
    "text, words",
    [(b"hi\n/set top_p 9\nbye\n", "stdin line 2: /set: top_p"),
     (b"\xff\xfe\n", "stdin line 1: not valid UTF-8"),
     (b"/nope\n", "unknown command /nope")],
)  # fmt: skip
def test_piped_bad_line_is_one_error_line(ckpt, text, words):
    proc = run_pipe(ckpt, text, "--temperature", "0")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("llm-chat: error: ") and words in err


def test_closed_stdin_is_an_error(ckpt):
    proc = subprocess.run([str(LLM_CHAT), str(ckpt)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == b""  # /dev/null: an empty pipe
    proc = subprocess.run(
        [str(LLM_CHAT), str(ckpt)], capture_output=True, timeout=TIMEOUT,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert proc.returncode == 2 and b"stdin is closed" in proc.stderr
