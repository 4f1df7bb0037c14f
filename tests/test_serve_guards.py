"""llm-serve against a new user's bad inputs: an empty API key, JSON nested too deep, a
client gone mid-body, HEAD /health, a completion without a prompt, a KV cache too big for
memory; chat histories longer than the context are shortened only when asked (truncate),
as llm-chat does; llm-chat and the server share one top-p default."""

import socket
import time

import pytest
from chat_fixtures import trained_checkpoint
from procs import HANG_GUARD_S
from serve_fixtures import serving
from tritonlm.cli import chat as chat_cli
from tritonlm.cli import serve as serve_cli
from tritonlm.engine.checkpoint.save_load import save_checkpoint
from tritonlm.engine.inference.chat_prompt import build_chat_prompt, history_budget
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.inference.scheduler import Scheduler
from tritonlm.engine.inference.serve_request import (
    Limits,
    RequestError,
    decode_body,
    parse_request,
)
from tritonlm.engine.model.config import ConfigError, ModelConfig
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
TURNS = [("what is a token?", "a piece of text."), ("hi", "hello there, friend.")] * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(ckpt):
    return BpeTokenizer.load(ckpt / "tokenizer.json")


def history(question="bye"):
    msgs = [{"role": "system", "content": "be brief"}]
    for u, a in TURNS:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


@pytest.mark.parametrize("key", ["", " ", "\t \n"])
def test_empty_api_key_is_a_usage_error(ckpt, capsys, key):
    assert serve_cli.main([str(ckpt), "--port", "0", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key is empty" in err


@pytest.mark.parametrize("env, flag, want", [
    ({}, None, None),                          # no key anywhere: no auth
    ({"TRITONLM_API_KEY": ""}, None, None),    # set but empty: the same
    ({"TRITONLM_API_KEY": " k1 "}, None, "k1"),  # stripped, as the header's token is
    ({"TRITONLM_API_KEY": "k1"}, "k2", "k2"),  # the flag wins
])  # fmt: skip
def test_api_key_comes_from_the_flag_or_the_environment(env, flag, want):
    args = serve_cli.build_parser().parse_args(
        ["ck"] + ([] if flag is None else ["--api-key", flag])
    )
    assert serve_cli.api_key_of(args, env) == want


def test_a_blank_api_key_in_the_environment_is_refused(ckpt, capsys, monkeypatch):
    """A key of spaces could never match a (stripped) bearer token: every request would get
    401. One line, exit 2, before the model is loaded."""
    monkeypatch.setenv("TRITONLM_API_KEY", "   ")
    assert serve_cli.main([str(ckpt), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "$TRITONLM_API_KEY is empty (or only spaces)" in err


def test_one_top_p_default_for_chat_and_server(tok):
    limits = Limits("m", 64, 8)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    server = parse_request(body, "chat", tok, limits).sampling.top_p
    chat = chat_cli.sampling_from_args(chat_cli.build_parser().parse_args(["CK"])).top_p
    assert server == chat == SamplingConfig().top_p == 1.0


@pytest.mark.parametrize("depth", [33, 100, 1500, 100_000])
@pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a":', "}")])
def test_deep_json_is_invalid_json(depth, open_, close):
    with pytest.raises(RequestError) as err:
        decode_body((open_ * depth + "1" + close * depth).encode())
    assert err.value.status == 400 and err.value.code == "invalid_json"
    assert decode_body(b'{"a": [[[1]]]}') == {"a": [[[1]]]}


def test_truncate_drops_the_oldest_turns_as_llm_chat_does(tok):
    limits = Limits("m", 64, 16)
    body = {"model": "m", "messages": history(), "max_tokens": 16}
    with pytest.raises(RequestError) as err:
        parse_request(body, "chat", tok, limits)
    assert err.value.code == "context_length_exceeded" and "truncate" in err.value.message
    req = parse_request({**body, "truncate": True}, "chat", tok, limits)
    expected = build_chat_prompt(tok, history(), history_budget(64, 16))
    assert req.prompt_ids == expected.ids and req.dropped_messages == expected.dropped > 0
    assert len(req.prompt_ids) <= 64 - 16
    short = {"model": "m", "messages": history()[-1:], "truncate": True}
    assert parse_request(short, "chat", tok, limits).dropped_messages == 0
    for bad in ({**body, "truncate": "yes"}, {"model": "m", "prompt": "x", "truncate": True}):
        with pytest.raises(RequestError) as err:
            parse_request(bad, "chat" if "messages" in bad else "completion", tok, limits)
        assert err.value.param == "truncate"
    with pytest.raises(RequestError) as err:
        parse_request({"model": "m"}, "completion", tok, limits)
    assert err.value.message == "prompt is required (a string)"


def test_kv_cache_too_big_is_refused_before_allocating(tok, tmp_path, capsys):
    # 4096 rows x 10**5 positions x 2 heads x 32 dims x keys and values: 195 GiB
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=10**5)  # fmt: skip
    model = Transformer(cfg, backend="torch")
    with pytest.raises(ConfigError, match="cache of 4096 rows x 100000 positions needs 195.3"):
        Scheduler(model, tok, max_batch=4096)
    with pytest.raises(ConfigError, match="KV cache"):
        model.new_cache(10**9, max_len=16)
    save_checkpoint(tmp_path / "long", model, tok, train_config={})
    argv = [str(tmp_path / "long"), "--port", "0", "--max-batch", "4096", "--device", "cpu"]
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "KV cache" in err[0] and "GiB" in err[0]


# ----------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with serving(ckpt, tmp_path_factory.mktemp("guards"), "--max-new-tokens-cap", "16") as srv:
        yield srv


def _no_traceback(server):
    text = server.log.read_text(encoding="utf-8")
    assert "Traceback" not in text and "Exception" not in text, text


DEEP = {
    "arrays": "[" * 1500 + "]" * 1500,  # the 3 KB body
    "objects": '{"model": ' * 1000 + "1" + "}" * 1000,
    "one field": '{"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "stop": '
                 + "[" * 40 + '"x"' + "]" * 40 + "}",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_json_is_a_400_and_no_traceback(server, name):
    r = server.http.post(CHAT, content=DEEP[name])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    _no_traceback(server)


def test_head_health_and_a_completion_without_prompt(server):
    assert server.http.head("/health").status_code == 200
    r = server.http.post(COMP, json={"model": "ckpt"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt is required (a string)"


def test_client_gone_mid_body_logs_at_most_one_line(server):
    host, port = server.url.removeprefix("http://").split(":")
    before = len(server.log.read_text(encoding="utf-8").splitlines())
    for _ in range(3):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 1000\r\n\r\n{\"model\": ".encode())  # fmt: skip
            time.sleep(0.2)
    r = server.http.post(CHAT, json={"model": "ckpt", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 200
    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # the disconnects are logged asynchronously: wait for their lines
        lines = server.log.read_text(encoding="utf-8").splitlines()[before:]
        gone = [x for x in lines if "disconnected" in x]
        if len(gone) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(gone) == 3 and len(lines) == 4, lines  # one line each, and the "done" line
    _no_traceback(server)


def test_truncate_over_http(server):
    body = {"model": "ckpt", "messages": history(), "max_tokens": 8, "temperature": 0}
    r = server.http.post(CHAT, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    for stream in (False, True):
        r = server.http.post(CHAT, json={**body, "truncate": True, "stream": stream})
        assert r.status_code == 200, r.text
        assert int(r.headers["x-dropped-messages"]) > 0
    r = server.http.post(CHAT, json={**body, "messages": history()[-1:], "truncate": True})
    assert r.status_code == 200 and "x-dropped-messages" not in r.headers
