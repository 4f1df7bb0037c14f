"""Continuous batching without HTTP: per-row KV cache, join/leave at step boundaries,
cancellation, the bounded queue, and answers equal to running each request alone."""

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.inference.generate import generate
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.inference.scheduler import QueueFull, Scheduler, finish_reason

CTX = 40
TEXTS = ["the cat sat on the mat. the dog ate the hat. héllo wörld ✓ naïve café"] * 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=290)


@pytest.fixture(scope="module")
def model(tok):
    # A large init std makes a random model's greedy choices vary from step to step.
    return tiny_model(tok, backend="torch", d_ff=64, max_seq_len=CTX, init_std=0.3)


def prompt_of(n, start=3):
    return [(start + 7 * i) % 250 for i in range(n)]


def greedy(n=30, **kw):
    return SamplingConfig(temperature=0, max_new_tokens=n, **kw)


def token_only(model, **kw):
    """A scheduler without a tokenizer (no text, no stop tokens): pure token streams."""
    return Scheduler(model, None, **kw)


def drain(handle):
    """Every event delivered so far (the scheduler was stepped by hand)."""
    return handle.delivered()


def run_until_idle(sched, limit=500):
    for _ in range(limit):
        load = sched.load()
        if not load["active"] and not load["waiting"]:
            return
        sched.step()
    raise AssertionError("the scheduler never became idle")


def alone(model, prompt, cfg, tok=None):
    stops = None if tok is not None else []
    return generate(model, tok, prompt, cfg, stop_token_ids=stops)


def test_row_view_matches_full_forward(model):
    """Rows at different lengths, one decode step each: logits equal a full recompute."""
    lengths = [3, 9, 1, 6]
    seqs = [prompt_of(n + 1, start=s) for s, n in enumerate(lengths)]
    cache = model.new_cache(len(seqs), max_len=CTX)
    for r, seq in enumerate(seqs):  # prefill each row on its own, into its own slots
        sub = type(cache)(k=[t[r : r + 1] for t in cache.k], v=[t[r : r + 1] for t in cache.v],
                          pad=cache.pad[:1])  # fmt: skip
        model.forward_cached(torch.tensor([seq[:-1]]), sub)
    view = cache.row_view(len(seqs), lengths)
    got = model.forward_cached(torch.tensor([[s[-1]] for s in seqs]), view)[:, -1]
    for r, seq in enumerate(seqs):
        want = model(torch.tensor([seq]))[0, -1]
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
    assert view.lengths.tolist() == [n + 1 for n in lengths] and view.pos == 10


def test_batch_equals_alone_with_staggered_joins(model):
    """Requests prefilled together, joining a running batch at different steps, leaving at
    different steps and moving rows when others leave get exactly their solo greedy tokens."""
    sched = token_only(model, max_batch=3, max_queue=10)
    specs = [(1, 25), (5, 4), (13, 30), (3, 12), (20, 18), (8, 1), (2, 27)]
    handles = []
    for i, (plen, n) in enumerate(specs):
        handles.append(sched.submit(prompt_of(plen, start=i), greedy(n)))
        if i >= 2:  # the first three are prefilled together (right-padded), then one
            sched.step()  # request arrives per step and joins the batch already running
    run_until_idle(sched)
    for i, ((plen, n), h) in enumerate(zip(specs, handles, strict=True)):
        events = drain(h)
        assert events[-1].done and sum(e.n_tokens for e in events) == len(
            events[-1].result.token_ids
        )
        want = alone(model, prompt_of(plen, start=i), greedy(n)).token_ids
        assert events[-1].result.token_ids == want, i


def test_join_and_leave_at_step_boundaries(model):
    sched = token_only(model, max_batch=2, max_queue=4)
    a = sched.submit(prompt_of(4), greedy(1))  # done at its first token
    b = sched.submit(prompt_of(6), greedy(5))
    c = sched.submit(prompt_of(2), greedy(5))
    assert sched.load()["waiting"] == 3 and sched.load()["active"] == 0  # nothing runs yet
    sched.step()  # a and b join the two rows; a finishes at once and leaves before decoding
    assert sched.load() == {"active": 1, "waiting": 1, "max_batch": 2, "max_queue": 4}
    assert [e.done for e in drain(a)] == [True]
    assert [e.done for e in drain(b)] == [False, False]  # b: first token, then one decode
    assert drain(c) == []
    sched.step()  # c takes the freed row at this boundary
    assert sched.load()["active"] == 2 and sched.load()["waiting"] == 0
    assert len(drain(c)) == 2 and len(drain(b)) == 1
    run_until_idle(sched)
    assert drain(c)[-1].result.token_ids == alone(model, prompt_of(2), greedy(5)).token_ids


def test_cancel_frees_the_row_within_one_step(model):
    sched = token_only(model, max_batch=2, max_queue=0)
    gone = sched.submit(prompt_of(5), greedy(30))
    stays = sched.submit(prompt_of(9, start=2), greedy(30))
    sched.step()
    sched.step()
    steps, before = sched.steps, sum(e.n_tokens for e in drain(gone))
    gone.cancel()
    sched.step()  # the very next step: the row is given back, the request is told
    assert sched.steps == steps + 1 and sched.load()["active"] == 1
    last = drain(gone)[-1]
    assert last.done and last.result.stop_reason == "interrupted"
    assert len(last.result.token_ids) == before == 3  # nothing generated after the cancel
    run_until_idle(sched)
    # The survivor moved from row 1 to row 0 and still matches its solo run.
    want = alone(model, prompt_of(9, start=2), greedy(30)).token_ids
    assert drain(stays)[-1].result.token_ids == want


def test_bounded_queue_refuses(model):
    sched = token_only(model, max_batch=1, max_queue=1)
    sched.submit(prompt_of(3), greedy(5))  # will take the free row
    sched.submit(prompt_of(3), greedy(5))  # waits
    with pytest.raises(QueueFull) as err:
        sched.submit(prompt_of(3), greedy(5))
    assert err.value.retry_after_s >= 1
    with pytest.raises(ValueError, match="prompt must have"):
        sched.submit(prompt_of(CTX + 1), greedy(5))


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model):
    cfg = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=20, seed=7)
    solo = token_only(model, max_batch=4, max_queue=4)
    h = solo.submit(prompt_of(6), cfg)
    run_until_idle(solo)
    crowd = token_only(model, max_batch=4, max_queue=4)
    others = [crowd.submit(prompt_of(3 + i, start=i), SamplingConfig(temperature=1.0, seed=i,
                                                                     max_new_tokens=20))
              for i in range(3)]  # fmt: skip
    h2 = crowd.submit(prompt_of(6), cfg)
    run_until_idle(crowd)
    assert drain(h)[-1].result.token_ids == drain(h2)[-1].result.token_ids
    assert all(drain(o)[-1].done for o in others)


def test_threaded_text_with_stop_strings_and_penalties(model, tok):
    """The running thread: text pieces join to the result, stop strings and penalties
    behave as in generate(), and stop() ends the loop."""
    prompt = [tok.bos_id, *tok.encode("the cat")]
    configs = [greedy(20, stop=("at",)), greedy(20, frequency_penalty=1.5),
               greedy(15, repetition_penalty=1.3, presence_penalty=0.5)]  # fmt: skip
    done = []
    sched = Scheduler(model, tok, max_batch=2, max_queue=8,
                      on_done=lambda h, r: done.append(h.id)).start()  # fmt: skip
    try:
        handles = [sched.submit(prompt, c, request_id=f"r{i}") for i, c in enumerate(configs)]
        for h, cfg in zip(handles, configs, strict=True):
            events = list(h)
            res = events[-1].result
            want = alone(model, prompt, cfg, tok)
            assert res.token_ids == want.token_ids and res.stop_reason == want.stop_reason
            assert "".join(e.text for e in events) == res.text == want.text
        assert sorted(done) == ["r0", "r1", "r2"]
    finally:
        sched.stop()
    assert finish_reason("stop_string") == "stop" and finish_reason("context") == "length"
