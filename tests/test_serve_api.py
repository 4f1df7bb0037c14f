"""llm-serve through the official openai client: chat and completions, streaming and not,
usage, finish reasons, stop strings, seeds, and one log line per request."""

import concurrent.futures

import pytest
from chat_fixtures import CHATS, trained_checkpoint
from serve_fixtures import serving
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = trained_checkpoint(tmp_path_factory)
    with serving(ckpt, tmp_path_factory.mktemp("serve"), "--max-batch", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return BpeTokenizer.load(trained_checkpoint(tmp_path_factory) / "tokenizer.json")


def ask(client, text, **kw):
    return client.chat.completions.create(
        model="ckpt", messages=[{"role": "user", "content": text}], temperature=0, **kw
    )


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["ckpt"]
    assert client.models.retrieve("ckpt").owned_by == "tritonlm"


@pytest.mark.parametrize("question,answer", CHATS)
def test_chat_answers_and_usage(client, tok, question, answer):
    r = ask(client, question)
    assert r.object == "chat.completion" and r.model == "ckpt"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == answer
    assert r.choices[0].finish_reason == "stop"
    prompt, _ = tok.render_chat([{"role": "user", "content": question}], True)
    answer_tokens = len(tok.encode(answer)) + 1  # and the closing <|end|>
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), answer_tokens)
    assert r.usage.total_tokens == len(prompt) + answer_tokens


def test_chat_stream(client):
    chunks = list(ask(client, "bye", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "goodbye! ünïcode ✓"  # multi-byte characters arrive whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 1
    assert len({c.id for c in chunks}) == 1


def test_length_limit_and_stop_strings(client):
    r = ask(client, "hi", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = ask(client, "hi", max_completion_tokens=2)
    assert r.usage.completion_tokens == 2
    r = ask(client, "hi", stop=[" there", "zzz"])
    assert r.choices[0].message.content == "hello" and r.choices[0].finish_reason == "stop"
    pieces = list(ask(client, "what is a token?", stream=True, stop="text"))
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == "a piece of " and pieces[-1].choices[0].finish_reason == "stop"


def test_completions(client):
    r = client.completions.create(model="ckpt", prompt="hi", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 1 + 1  # <|bos|> hi
    streamed = client.completions.create(model="ckpt", prompt="hi", max_tokens=4,
                                         temperature=0, stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_reproducible(client):
    def sample(seed):
        r = client.completions.create(model="ckpt", prompt="the", max_tokens=12,
                                      temperature=1.5, seed=seed)  # fmt: skip
        return r.choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(s) for s in range(4)}) > 1  # the seed does change the sample


def test_concurrent_requests_match_sequential(client):
    """Requests batched together get the answers they get alone (greedy)."""
    questions = [q for q, _ in CHATS] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: ask(client, q).choices[0].message.content, questions))
    assert got == [a for _, a in CHATS] * 4


def test_one_log_line_per_request(client, server):
    r = ask(client, "hi")
    records = {x["id"]: x for x in server.log_lines() if x.get("event") == "done"}
    rec = records[r.id]
    assert rec["prompt_tokens"] == r.usage.prompt_tokens
    assert rec["completion_tokens"] == r.usage.completion_tokens
    assert rec["finish"] == "end" and rec["ttft_s"] > 0 and rec["tokens_per_s"] > 0
