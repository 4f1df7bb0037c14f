"""llm-serve's log-probabilities (chat logprobs/top_logprobs, completions logprobs + echo)
and n > 1, through the openai client: the numbers are llm-eval's, streamed = whole, and
n seeded answers are the answers of n seeded single requests."""

import math

import pytest
import torch
from chat_fixtures import trained_checkpoint
from serve_fixtures import serving
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.eval.choice import request_ids
from tritonlm.engine.eval.text import score_rows

MSG = [{"role": "user", "content": "what is a token?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def client(ckpt, tmp_path_factory):
    with serving(ckpt, tmp_path_factory.mktemp("serve"), "--max-batch", "6") as srv:
        yield srv.openai()


def reference(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, and the full distributions, from one forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))], logp


def test_chat_logprobs_are_the_models(client, loaded):
    r = client.chat.completions.create(model="ckpt", messages=MSG, temperature=0,
                                       logprobs=True, top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == "a piece of text."
    tok = loaded.tokenizer
    prompt, _ = tok.render_chat(MSG, add_generation_prompt=True)
    answer = tok.encode("a piece of text.")
    assert [bytes(t.bytes) for t in content] == [tok.token_bytes(i) for i in answer]
    want, _ = reference(loaded.model, prompt + answer)
    got = [t.logprob for t in content]
    assert got == pytest.approx(want[len(prompt) - 1 :], abs=1e-4)
    for t in content:  # greedy: the chosen token leads its alternatives, sorted
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and tops[0] == pytest.approx(t.logprob)
    plain = client.chat.completions.create(model="ckpt", messages=MSG, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_scores_like_llm_eval(client, loaded):
    """The harness's local-completions request: token ids, echo, logprobs=1, max_tokens=1;
    the continuation's log-likelihood is the sum over token_logprobs[ctxlen:-1]."""
    model, tok = loaded.model, loaded.tokenizer
    rows = [request_ids(tok, "hi", " hello there", 63), request_ids(tok, "bye", " a piece", 63)]
    want = score_rows(model, rows, batch_size=2)
    r = client.completions.create(model="ckpt", prompt=[ids for ids, _ in rows], max_tokens=1,
                                  temperature=0, logprobs=1, echo=True)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    for (ids, n), choice, expected in zip(rows, r.choices, want, strict=True):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
        ctxlen = len(ids) - n
        assert math.fsum(lp.token_logprobs[ctxlen:-1]) == pytest.approx(expected, abs=1e-4)
        assert lp.text_offset == sorted(lp.text_offset)
        assert choice.text.startswith(tok.decode(ids))
    text = client.completions.create(model="ckpt", prompt="hi", max_tokens=3, temperature=0,
                                     logprobs=2, echo=True)  # fmt: skip
    lp = text.choices[0].logprobs
    assert lp.tokens[0] == "<|bos|>" and lp.text_offset[:2] == [0, 0]  # the added BOS
    assert text.choices[0].text.startswith("hi") and len(lp.tokens) == 2 + 3
    assert "".join(lp.tokens[1:]) == text.choices[0].text
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])


def test_streamed_logprobs_equal_whole(client):
    kw = dict(model="ckpt", messages=MSG, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # No chunk for the closing <|end|>: every chunk with logprobs has content.
    assert all(c.choices[0].logprobs.content for c in chunks if c.choices[0].logprobs)
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-5)
    ckw = dict(model="ckpt", prompt="the", max_tokens=5, temperature=0, logprobs=1, echo=True)
    one = client.completions.create(**ckw).choices[0]
    parts = [c.choices[0] for c in client.completions.create(stream=True, **ckw)]
    assert "".join(p.text for p in parts) == one.text
    tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
    offsets = [t for p in parts if p.logprobs for t in p.logprobs.text_offset]
    assert tokens == one.logprobs.tokens and offsets == one.logprobs.text_offset


def test_n_seeded_equals_single_requests(client):
    kw = dict(model="ckpt", prompt="the", max_tokens=10, temperature=1.5)
    many = client.completions.create(n=3, seed=40, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    single = [client.completions.create(seed=40 + j, **kw) for j in range(3)]
    singles = [r.choices[0].text for r in single]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1  # the answers differ: each row has its own seed
    assert many.usage.prompt_tokens == single[0].usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == 3 * 10
    chat = dict(model="ckpt", messages=MSG, temperature=1.5, max_tokens=8, seed=7)
    streamed = {}
    for chunk in client.chat.completions.create(n=3, stream=True, **chat):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    alone = [client.chat.completions.create(**{**chat, "seed": 7 + j}).choices[0].message.content
             for j in range(3)]  # fmt: skip
    assert [streamed[j] for j in range(3)] == alone


def test_shared_prefill_in_the_scheduler(loaded):
    """Rows that join together with the same prompt are prefilled once (the row is copied)
    and still answer as if alone."""
    from tritonlm.engine.inference.sampling import SamplingConfig
    from tritonlm.engine.inference.scheduler import Scheduler

    sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=4, max_queue=4)
    prompt = loaded.tokenizer.render_chat(MSG, add_generation_prompt=True)[0]
    cfgs = [SamplingConfig(temperature=5.0, seed=s, max_new_tokens=6) for s in (1, 2, 1)]
    handles = sched.submit_many([(prompt, c, None, None, None) for c in cfgs])
    texts = ["".join(e.text for e in events) for events in _step_until_done(sched, handles)]
    assert sched.prefilled_prompts == 1
    assert texts[0] == texts[2] != texts[1]
    alone = Scheduler(loaded.model, loaded.tokenizer, max_batch=1, max_queue=0)
    (events,) = _step_until_done(alone, [alone.submit(prompt, cfgs[1])])
    assert "".join(e.text for e in events) == texts[1]


def _step_until_done(sched, handles) -> list[list]:
    """Step a scheduler by hand until every handle's last event is final; their events."""
    got = [[] for _ in handles]
    while not all(events and events[-1].done for events in got):
        sched.step()
        for events, h in zip(got, handles, strict=True):
            events += h.delivered()
    return got
