"""The scheduler's prefix cache: longest common prefix lookups, LRU eviction within a
token budget, and greedy answers identical with and without it over a multi-turn chat."""

import numpy as np
import pytest
import torch
from tritonlm.engine.inference.prefix_cache import PrefixCache
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.inference.scheduler import Scheduler
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer


def kv(n, layers=2, value=0.0):
    """K/V shaped like one cache row: [Hkv=2, n, Dh=4] per layer, filled with value + slot."""
    t = value + torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, 4).clone()
    return [t.clone() for _ in range(layers)], [t.clone() for _ in range(layers)]


def test_lookup_takes_the_longest_common_prefix():
    cache = PrefixCache(max_tokens=100, min_match=2)
    cache.store([1, 2, 3, 4, 5], *kv(5))
    cache.store([1, 2, 7, 8], *kv(4, value=100))
    m = cache.lookup([1, 2, 3, 4, 9, 9])
    assert m.length == 4 and float(m.k[0][0, 3, 0]) == 3.0
    assert cache.lookup([1, 2, 7, 8, 9]).length == 4
    assert cache.lookup([1, 2, 3, 4, 5]).length == 4  # never the prompt's last token
    assert cache.lookup([1, 9, 9]) is None  # shorter than min_match
    assert cache.lookup([5, 5, 5]) is None
    assert (cache.stats.hits, cache.stats.hit_tokens, cache.stats.lookups) == (3, 12, 5)


def test_budget_lru_and_extension():
    cache = PrefixCache(max_tokens=10, min_match=2)
    cache.store([1, 2, 3, 4], *kv(4))
    cache.store([5, 6, 7, 8], *kv(4))
    assert cache.lookup([1, 2, 3, 9]) is not None  # [1, 2, 3, 4] is now the most recent
    cache.store([9, 9, 9, 9], *kv(4))  # 12 > 10 tokens: the least recently used goes
    assert cache.tokens == 8 and len(cache) == 2 and cache.stats.evictions == 1
    assert cache.lookup([5, 6, 7, 0]) is None and cache.lookup([1, 2, 3, 0]) is not None
    cache.store([1, 2, 3, 4, 5, 6], *kv(6))  # extends [1, 2, 3, 4]: replaces it
    assert cache.tokens == 10 and len(cache) == 2
    cache.store([1, 2, 3], *kv(3))  # already held inside an entry: nothing new
    assert cache.tokens == 10
    cache.store(list(range(11)), *kv(11))  # larger than the whole budget: not kept
    assert cache.tokens == 10
    m = cache.lookup([1, 2, 3, 4, 5, 6, 0])
    assert m.length == 6 and np.allclose(m.v[1][0, :, 0].numpy(), np.arange(6))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      max_seq_len=160, init_std=0.3)  # fmt: skip
    return Transformer(cfg, backend="torch").eval()


def chat_replay(model, prefix_cache, turns=5):
    """Each turn's prompt is the last prompt, its answer and a new 'user message'; two
    conversations run side by side. Greedy answers, per conversation."""
    sched = Scheduler(model, None, max_batch=2, max_queue=4, prefix_cache=prefix_cache)
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 9, 8, 7, 6, 5]]
    answers = [[], []]
    for turn in range(turns):
        cfg = SamplingConfig(temperature=0, max_new_tokens=6)
        handles = [sched.submit(p, cfg) for p in prompts]
        while sched.load()["active"] or sched.load()["waiting"]:
            sched.step()
        for c, h in enumerate(handles):
            got = list(h)[-1].result.token_ids
            answers[c].append(got)
            prompts[c] = prompts[c] + got + [(11 * turn + 5 * c + k) % 250 + 20 for k in range(4)]
    return answers


def test_greedy_answers_identical_with_and_without(model):
    cache = PrefixCache(max_tokens=4096, min_match=4)
    with_cache = chat_replay(model, cache)
    assert with_cache == chat_replay(model, None)
    # Every turn after the first reused its conversation's history.
    assert cache.stats.hits == 2 * 4 and cache.stats.hit_tokens > 2 * 4 * 6
    assert len(cache) == 2  # one entry per conversation: each turn replaced the last


def test_a_running_prompt_serves_a_later_request(model):
    """A prompt is kept when it joins: a request that arrives while the first still runs
    reuses the shared preamble and answers as it would alone."""
    cache = PrefixCache(max_tokens=4096, min_match=4)
    sched = Scheduler(model, None, max_batch=2, max_queue=2, prefix_cache=cache)
    preamble = [(7 * i + 3) % 250 + 20 for i in range(30)]
    cfg = SamplingConfig(temperature=0, max_new_tokens=20)
    first = sched.submit(preamble + [5, 6], cfg)
    sched.step()
    second = sched.submit(preamble + [9], SamplingConfig(temperature=0, max_new_tokens=8))
    while sched.load()["active"] or sched.load()["waiting"]:
        sched.step()
    assert cache.stats.hits == 1 and cache.stats.hit_tokens == 30
    alone = Scheduler(model, None, max_batch=1, max_queue=0)
    h = alone.submit(preamble + [9], SamplingConfig(temperature=0, max_new_tokens=8))
    while alone.load()["active"] or alone.load()["waiting"]:
        alone.step()
    assert list(second)[-1].result.token_ids == list(h)[-1].result.token_ids
    assert list(first)[-1].result.new_tokens == 20
