"""Bad requests get OpenAI-shaped 4xx errors and the server keeps answering; API keys;
a full queue answers 429 with Retry-After."""

import json
import threading
import time

import httpx
import pytest
from chat_fixtures import trained_checkpoint
from procs import HANG_GUARD_S
from serve_fixtures import long_checkpoint, serving

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return json.dumps({"model": "ckpt", "messages": MSG, **kw})


# (name, method, path, raw body, status, param that the error names or None)
BAD = [
    ("not json", "POST", CHAT, "{model: ckpt", 400, None),
    ("not utf-8", "POST", CHAT, b"\xff\xfe{}", 400, None),
    ("body is a list", "POST", CHAT, "[1, 2]", 400, None),
    ("empty body", "POST", CHAT, "", 400, None),
    ("no model", "POST", CHAT, json.dumps({"messages": MSG}), 400, "model"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), 404, "model"),
    ("no messages", "POST", CHAT, json.dumps({"model": "ckpt"}), 400, "messages"),
    ("messages empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("message not object", "POST", CHAT, chat(messages=["hi"]), 400, "messages[0]"),
    ("bad role", "POST", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role"),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content"),
    ("image part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), 400,
     "messages[0].content"),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens above cap", "POST", CHAT, chat(max_tokens=33), 400, "max_tokens"),
    ("max_tokens a float", "POST", CHAT, chat(max_tokens=2.5), 400, "max_tokens"),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature a bool", "POST", CHAT, chat(temperature=True), 400, "temperature"),
    ("temperature NaN", "POST", CHAT, '{"model": "ckpt", "messages": [{"role": "user", '
     '"content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("penalty out of range", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("seed negative", "POST", CHAT, chat(seed=-1), 400, "seed"),
    ("stop not strings", "POST", CHAT, chat(stop=[1, 2]), 400, "stop"),
    ("five stops", "POST", CHAT, chat(stop=list("abcde")), 400, "stop"),
    ("stream a string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage":
                                                                         True}), 400,
     "stream_options"),
    ("n = 0", "POST", CHAT, chat(n=0), 400, "n"),
    ("n above the cap", "POST", CHAT, chat(n=17), 400, "n"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
     400, "tools"),
    ("logit_bias", "POST", CHAT, chat(logit_bias={"5": 100}), 400, "logit_bias"),
    ("chat logprobs a number", "POST", CHAT, chat(logprobs=2), 400, "logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs 21", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("chat echo", "POST", CHAT, chat(echo=True), 400, "echo"),
    ("response_format yaml", "POST", CHAT, chat(response_format={"type": "yaml"}), 400,
     "response_format.type"),
    ("json_schema without schema", "POST", CHAT, chat(response_format={"type": "json_schema"}),
     400, "response_format.json_schema"),
    ("unknown field", "POST", CHAT, chat(temprature=0.5), 400, "temprature"),
    ("prompt too long", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi " * 80}]),
     400, "messages"),
    ("completion prompt missing", "POST", COMP, json.dumps({"model": "ckpt"}), 400, "prompt"),
    ("completion prompt id out of range", "POST", COMP,
     json.dumps({"model": "ckpt", "prompt": [[1, 99999]]}), 400, "prompt"),
    ("completion prompt nested", "POST", COMP, json.dumps({"model": "ckpt", "prompt": [["a"]]}),
     400, "prompt"),
    ("completion echo a string", "POST", COMP,
     json.dumps({"model": "ckpt", "prompt": "a", "echo": "yes"}), 400, "echo"),
    ("completion logprobs 6", "POST", COMP,
     json.dumps({"model": "ckpt", "prompt": "a", "logprobs": 6}), 400, "logprobs"),
    ("best_of", "POST", COMP, json.dumps({"model": "ckpt", "prompt": "a", "best_of": 2}), 400,
     "best_of"),
    ("body too large", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 5000}]),
     413, None),
    ("unknown route", "POST", "/v1/embeddings", chat(), 404, None),
    ("wrong method", "GET", CHAT, None, 405, None),
    ("unknown model card", "GET", "/v1/models/other", None, 404, "model"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = trained_checkpoint(tmp_path_factory)
    args = ("--max-new-tokens-cap", "32", "--max-body-bytes", "4096")
    with serving(ckpt, tmp_path_factory.mktemp("serve"), *args) as srv:
        yield srv


def valid_answer(http) -> str:
    r = http.post(CHAT, content=chat(temperature=0))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("name,method,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, method, path, body, status, param):
    r = server.http.request(method, path, content=body,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert valid_answer(server.http) == "hello there, friend."  # still serving


def test_at_least_twenty_kinds():
    assert len({b[0] for b in BAD}) >= 20 and all(400 <= b[4] < 500 for b in BAD)


def test_api_key_and_full_queue(tmp_path_factory):
    """--api-key (over $TRITONLM_API_KEY) guards /v1; one row + one queue slot busy -> 429."""
    ckpt = long_checkpoint(tmp_path_factory)
    args = ("--max-batch", "1", "--max-queue", "1", "--max-new-tokens-cap", "4000")
    env = {"TRITONLM_API_KEY": "from-env"}
    with serving(ckpt, tmp_path_factory.mktemp("q"), *args, api_key="s3cret", env=env) as srv:
        body = {"model": "long", "messages": MSG, "temperature": 0}
        for key in (None, "from-env", "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            bare = httpx.post(srv.url + CHAT, json=body, headers=headers)
            assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # no secrets there
        long = {**body, "max_tokens": 4000, "stream": True}
        with srv.http.stream("POST", CHAT, json=long) as first:  # holds the only row
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: dropping the iterator closes the connection
            next(lines)
            waiting = {}
            queued = threading.Thread(target=lambda: waiting.update(
                r=srv.http.post(CHAT, json={**body, "max_tokens": 3})))  # fmt: skip
            queued.start()
            deadline = time.monotonic() + HANG_GUARD_S
            while srv.http.get("/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            full = srv.http.post(CHAT, json=body)
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["code"] == "queue_full"
        # Leaving the stream disconnects: its row frees and the queued request runs.
        queued.join(HANG_GUARD_S)
        assert waiting["r"].status_code == 200
        assert waiting["r"].json()["usage"]["completion_tokens"] == 3
        done = {x["id"]: x for x in srv.log_lines() if x.get("event") == "done"}
        assert sorted(x["finish"] for x in done.values()) == ["interrupted", "max_new_tokens"]


def test_parse_request_without_http(tmp_path_factory):
    """The engine decides what a body means: OpenAI's defaults, the project's extra
    samplers, text parts and the developer role, one error per bad field."""
    from tritonlm.engine.inference.serve_request import Limits, RequestError, parse_request
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

    tok = BpeTokenizer.load(trained_checkpoint(tmp_path_factory) / "tokenizer.json")
    limits = Limits("ckpt", max_seq_len=64, max_tokens_cap=32)
    req = parse_request({"model": "ckpt", "messages": MSG}, "chat", tok, limits)
    cfg = req.sampling
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, req.stream) == (1.0, 1.0, 32, False)
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]
    extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "stop": "x", "seed": 3}
    body = {"model": "ckpt", "messages": messages, "max_completion_tokens": 7, **extras}
    req = parse_request(body, "chat", tok, limits)
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.prompt_ids == tok.render_chat(system, add_generation_prompt=True)[0]
    cfg = req.sampling
    assert (cfg.top_k, cfg.min_p, cfg.repetition_penalty) == (5, 0.1, 1.2)
    assert (cfg.stop, cfg.seed, cfg.max_new_tokens) == (("x",), 3, 7)
    completion = parse_request({"model": "ckpt", "prompt": ["hi"]}, "completion", tok, limits)
    assert completion.prompt_ids == [tok.bos_id, *tok.encode("hi")]
    with pytest.raises(RequestError) as err:
        parse_request({"model": "ckpt", "messages": MSG, "temperature": 1e-9}, "chat", tok, limits)
    assert err.value.status == 400 and err.value.param == "temperature"
