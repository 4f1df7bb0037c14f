"""Generation: KV cache parity, batches, context limits, stopping, streaming, chat prompts."""

from types import SimpleNamespace

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.inference.chat_prompt import build_chat_prompt, encode_raw_prompt
from tritonlm.engine.inference.generate import generate, generate_batch, stream
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model import decode_step
from tritonlm.engine.model.kv_cache import KVCache

CTX = 24
TEXTS = ["the cat sat on the mat. the dog ate the hat. héllo wörld ✓ naïve café"] * 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=290)


@pytest.fixture(scope="module")
def model(tok):
    # A large init std makes a random model's greedy choices vary from step to step.
    return tiny_model(tok, d_ff=64, max_seq_len=CTX, init_std=0.3)


def greedy(n=40, **kw):
    return SamplingConfig(temperature=0, max_new_tokens=n, **kw)


def prompt_of(n, start=3):
    return [(start + 7 * i) % 250 for i in range(n)]


# ----------------------------------------------------------------------------- cache parity


@pytest.mark.parametrize("plen", [1, 5, 13, CTX - 1, CTX])
def test_cache_matches_recompute(model, plen):
    prompt = prompt_of(plen)
    cfg = greedy()
    a = generate(model, None, prompt, cfg, use_cache=True, keep_logits=True)
    b = generate(model, None, prompt, cfg, use_cache=False, keep_logits=True)
    assert a.token_ids == b.token_ids
    assert a.stop_reason == b.stop_reason == "context"
    # the model read max_seq_len tokens: prompt + all new tokens but the last
    assert a.new_tokens == CTX - plen + 1
    if plen in (5, 13):
        assert len(set(a.token_ids)) > 5  # the random model does not just repeat a token
    # float32 rounding: a few ulps of the logits' magnitude (the two paths sum in
    # different orders: masked SDPA over the cache vs causal SDPA over the sequence)
    scale = max(float(la.abs().max()) for la in a.step_logits)
    for la, lb in zip(a.step_logits, b.step_logits, strict=True):
        torch.testing.assert_close(la, lb, atol=1e-5 * scale, rtol=1e-5)


def test_prefill_is_one_forward_then_one_token_per_step(model, monkeypatch):
    calls = []
    real_forward, real_step = model.forward_cached, decode_step.decode_logits

    def spy(idx, cache, **kwargs):
        calls.append(tuple(idx.shape))
        return real_forward(idx, cache, **kwargs)

    def step_spy(model, tokens, slots, pad, k, v, window):
        calls.append((tuple(tokens.shape), slots.tolist(), window))
        return real_step(model, tokens, slots, pad, k, v, window)

    monkeypatch.setattr(model, "forward_cached", spy)
    monkeypatch.setattr(decode_step, "decode_logits", step_spy)
    generate(model, None, prompt_of(9), greedy(6))
    # the prefill, then one fixed-shape step per token (the 6th token is never fed back)
    assert calls == [(1, 9)] + [((1,), [9 + i], 10 + i) for i in range(5)]


def test_max_new_tokens_and_uncached_has_no_cache(model, monkeypatch):
    r = generate(model, None, prompt_of(4), greedy(3))
    assert r.new_tokens == 3 and r.stop_reason == "max_new_tokens"
    monkeypatch.setattr(model, "forward_cached", None)  # would fail if called
    r2 = generate(model, None, prompt_of(4), greedy(3), use_cache=False)
    assert r2.token_ids == r.token_ids


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_matches_single(model, use_cache):
    prompts = [prompt_of(n, start=n) for n in (3, 11, CTX, 1, 7)]
    cfg = greedy(16)
    batch = generate_batch(model, None, prompts, cfg, use_cache=use_cache)
    for p, res in zip(prompts, batch, strict=True):
        alone = generate(model, None, p, cfg)
        assert res.token_ids == alone.token_ids
        assert res.stop_reason == alone.stop_reason
        assert res.prompt_tokens == len(p)
    assert [r.stop_reason for r in batch] == [
        "max_new_tokens",
        "context",
        "context",
        "max_new_tokens",
        "max_new_tokens",
    ]


def test_batch_rows_stop_independently(model, tok):
    # every row stops at its own stop token; the others go on
    prompts = [prompt_of(n, start=n) for n in (2, 6, 9)]
    first = [generate(model, None, p, greedy(1)).token_ids[0] for p in prompts]
    batch = generate_batch(model, None, prompts, greedy(8), stop_token_ids=[first[1]])
    assert batch[1].token_ids == [first[1]] and batch[1].stop_reason == "eos"
    for i in (0, 2):
        alone = generate(model, None, prompts[i], greedy(8), stop_token_ids=[first[1]])
        assert batch[i].token_ids == alone.token_ids


# ----------------------------------------------------------------------------- context / prompt


def test_long_prompt_keeps_most_recent_tokens(model):
    prompt = prompt_of(CTX + 16)
    r = generate(model, None, prompt, greedy(5))
    assert r.prompt_truncated == 16 and r.prompt_tokens == CTX
    assert "longer than the context" in r.warnings[0]
    same = generate(model, None, prompt[-CTX:], greedy(5))
    assert r.token_ids == same.token_ids and same.prompt_truncated == 0 and not same.warnings
    assert r.stop_reason == "context" and r.new_tokens == 1


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, None, [], greedy())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, None, [1, 10**6], greedy())
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, None, [1], greedy(stop=("x",)))


# ----------------------------------------------------------------------------- sampling


def test_seeded_generation_reproducible(model, tok):
    cfg = SamplingConfig(temperature=1.5, top_p=1.0, seed=123, max_new_tokens=15)
    prompt = prompt_of(3)
    a = generate(model, None, prompt, cfg)
    b = generate(model, None, prompt, cfg)
    c = generate(model, None, prompt, cfg.replace(seed=124))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # cache or not, same seed -> same tokens
    assert generate(model, None, prompt, cfg, use_cache=False).token_ids == a.token_ids
    # with penalties too
    pen = cfg.replace(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    assert (
        generate(model, None, prompt, pen).token_ids == generate(model, None, prompt, pen).token_ids
    )


def test_repetition_penalty_applies_to_prompt_and_answer(model):
    # a huge penalty with greedy decoding: never repeats a token seen in prompt or answer
    prompt = prompt_of(4)
    r = generate(model, None, prompt, greedy(15, repetition_penalty=1e6))
    seen = prompt + r.token_ids
    assert len(set(seen)) == len(seen)
    # presence penalty: only answer tokens count, so no answer token repeats
    r = generate(model, None, prompt, greedy(15, presence_penalty=1e4))
    assert len(set(r.token_ids)) == len(r.token_ids)


def test_training_mode_is_restored(model):
    model.train()
    try:
        generate(model, None, prompt_of(2), greedy(2))
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- scripted text


class ScriptedModel(torch.nn.Module):
    """A fake model whose n-th generated token is ``script[n]`` (cached path only)."""

    def __init__(self, script, vocab_size, max_seq_len=64, interrupt_at=None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.device = torch.device("cpu")  # as Transformer.device
        self.script = list(script)
        self.interrupt_at = interrupt_at

    def new_cache(self, batch_size, max_len=None, pad=None):
        slots = [torch.zeros(batch_size, 1, max_len, 1)]
        return KVCache(k=slots, v=slots, pad=torch.zeros(batch_size, dtype=torch.long))

    def forward_cached(self, idx, cache, last_only=False):
        self.width = idx.shape[1]  # the prefill
        cache.pos += idx.shape[1]
        return self.scripted(idx.shape[0], cache.pos)[:, None]

    def scripted(self, rows, filled):
        step = filled - self.width
        if self.interrupt_at is not None and step == self.interrupt_at:
            raise KeyboardInterrupt
        logits = torch.zeros(rows, self.config.vocab_size)
        logits[:, self.script[step]] = 10.0
        return logits


@pytest.fixture(autouse=True)
def scripted_decode_steps(monkeypatch):
    """A ScriptedModel's decode steps read its script (window = slots filled so far)."""
    real = decode_step.decode_logits

    def step(model, tokens, slots, pad, k, v, window):
        if isinstance(model, ScriptedModel):
            return model.scripted(tokens.shape[0], window)
        return real(model, tokens, slots, pad, k, v, window)

    monkeypatch.setattr(decode_step, "decode_logits", step)


def byte_script(text: str) -> list[int]:
    return list(text.encode())  # ids 0..255 are the single-byte tokens


def test_stream_pieces_utf8_and_stop_token(tok):
    script = byte_script("aé✓b") + [tok.end_id, ord("x")]
    m = ScriptedModel(script, tok.vocab_size)
    s = stream(m, tok, [tok.bos_id], greedy())
    pieces = list(s)
    assert [p.text for p in pieces] == ["a", "", "é", "", "", "✓", "b", ""]
    assert pieces[-1].token_id == tok.end_id
    r = s.result
    assert r.text == "aé✓b" and r.stop_reason == "end"
    assert r.token_ids == script[:-1] and r.new_tokens == len(script) - 1
    assert r.time_to_first_token_s > 0 and r.tokens_per_s > 0
    assert r.to_dict()["stop_reason"] == "end"


@pytest.mark.parametrize("name", ["<|user|>", "<|assistant|>", "<|system|>", "<|bos|>", "<|pad|>"])
def test_other_control_tokens_end_the_answer(tok, name):
    m = ScriptedModel(byte_script("hi") + [tok.special_tokens[name], 65], tok.vocab_size)
    r = generate(m, tok, [tok.bos_id], greedy())
    assert (r.text, r.stop_reason, r.new_tokens) == ("hi", "end", 3)


def test_eos_stops_too(tok):
    m = ScriptedModel(byte_script("ok") + [tok.eos_id, 65], tok.vocab_size)
    r = generate(m, tok, [tok.bos_id], greedy())
    assert (r.text, r.stop_reason) == ("ok", "eos")


@pytest.mark.parametrize("stop", [("END",), ("D",), ("zzz", "ND a"), ("é E",)])
def test_stop_strings_never_in_output(tok, stop):
    text = "Hello é END and more"
    m = ScriptedModel(byte_script(text) + [tok.eos_id], tok.vocab_size)
    s = stream(m, tok, [tok.bos_id], greedy(stop=stop))
    released = ""
    for piece in s:
        released += piece.text
        for st in stop:
            assert st not in released
    r = s.result
    first = min(text.find(st) for st in stop if st in text)
    assert released == r.text == text[:first]
    assert r.stop_reason == "stop_string"


def test_stop_string_spanning_multibyte_tokens(tok):
    # real BPE tokens: the stop string starts inside a multi-token stretch
    text = "naïve café ✓ the end"
    ids = tok.encode(text)
    m = ScriptedModel(ids + [tok.eos_id], tok.vocab_size)
    r = generate(m, tok, [tok.bos_id], greedy(stop=("é ✓",)))
    assert r.text == "naïve caf" and r.stop_reason == "stop_string"
    r = generate(m, tok, [tok.bos_id], greedy(stop=("nothing",)))
    assert r.text == text and r.stop_reason == "eos"


def test_held_text_released_at_max_new_tokens(tok):
    m = ScriptedModel(byte_script("abc Us"), tok.vocab_size)
    r = generate(m, tok, [tok.bos_id], greedy(6, stop=("User:",)))
    assert r.text == "abc Us" and r.stop_reason == "max_new_tokens"


def test_close_and_keyboard_interrupt_finish_the_result(tok):
    m = ScriptedModel(byte_script("abcdefgh"), tok.vocab_size)
    s = stream(m, tok, [tok.bos_id], greedy())
    assert next(s).text == "a" and next(s).text == "b"
    with pytest.raises(RuntimeError, match="still running"):
        _ = s.result
    s.close()
    assert (s.result.text, s.result.stop_reason, s.result.new_tokens) == ("ab", "interrupted", 2)
    assert list(s) == []

    m = ScriptedModel(byte_script("abcdefgh"), tok.vocab_size, interrupt_at=3)
    s = stream(m, tok, [tok.bos_id], greedy())
    got = ""
    with pytest.raises(KeyboardInterrupt):
        for piece in s:
            got += piece.text
    assert got == s.result.text == "abc" and s.result.stop_reason == "interrupted"


# ----------------------------------------------------------------------------- chat prompts


def test_build_chat_prompt_drops_oldest_turns_keeps_system(tok):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"question {i} about the cat"},
            {"role": "assistant", "content": f"answer {i} about the mat"},
        ]
    msgs.append({"role": "user", "content": "last one"})
    full = build_chat_prompt(tok, msgs, max_tokens=10_000)
    assert full.dropped == 0 and full.ids == tok.render_chat(msgs, add_generation_prompt=True)[0]
    assert full.ids[-1] == tok.assistant_id

    limit = len(full.ids) // 2
    cut = build_chat_prompt(tok, msgs, max_tokens=limit)
    assert len(cut.ids) <= limit and cut.dropped > 0 and cut.dropped % 2 == 0
    assert cut.messages[0] == msgs[0]  # system kept
    assert cut.messages[1]["role"] == "user"
    assert cut.messages[-1] == msgs[-1]
    assert cut.messages[1:] == msgs[1 + cut.dropped :]
    assert cut.ids == tok.render_chat(cut.messages, add_generation_prompt=True)[0]

    # the system prompt alone overflows: returned anyway (generation truncates it)
    tiny = build_chat_prompt(tok, msgs, max_tokens=3)
    assert tiny.messages == [msgs[0], msgs[-1]] and len(tiny.ids) > 3


def test_build_chat_prompt_cuts_a_too_long_last_message_keeping_the_template(tok):
    system = {"role": "system", "content": "be brief"}
    long = {"role": "user", "content": " ".join(f"word{i}" for i in range(200))}
    content = tok.encode(long["content"])
    frame = tok.render_chat([system, {**long, "content": ""}], add_generation_prompt=True)[0]
    p = build_chat_prompt(tok, [system, long], max_tokens=len(frame) + 10)
    assert len(p.ids) == len(frame) + 10 and p.cut_tokens == len(content) - 10
    assert p.ids[:-12] == frame[:-2]  # <|bos|> <|system|> ... <|user|> survive
    assert p.ids[-12:] == content[-10:] + [tok.end_id, tok.assistant_id]


def test_encode_raw_prompt(tok):
    assert encode_raw_prompt(tok, "the cat") == [tok.bos_id, *tok.encode("the cat")]


def test_chat_generation_end_to_end(model, tok):
    ids = build_chat_prompt(tok, [{"role": "user", "content": "hi"}], 16).ids
    r = generate(model, tok, ids, SamplingConfig(temperature=0.9, seed=0, max_new_tokens=8))
    assert r.prompt_tokens == len(ids) and 1 <= r.new_tokens <= 8
    assert r.stop_reason in ("eos", "end", "max_new_tokens", "context")
    assert r.text == tok.decode([t for t in r.token_ids if t not in (tok.eos_id, tok.end_id)])
