"""The fixed-shape decode step: per-row slots and left pads, equal to a full recompute,
shared by generate (batched, left-padded) and the scheduler; compiled, the same tokens."""

import pytest
import torch
from factories import tiny_model
from tritonlm.engine.inference.generate import generate, generate_batch
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model.decode_step import DecodeStep, decode_logits, next_bucket
from tritonlm.engine.model.kv_cache import left_pad

CTX = 32


@pytest.fixture(scope="module")
def model():
    return tiny_model(300, backend="torch", n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=CTX,
                      init_std=0.3)  # fmt: skip


def prompt_of(n, start=3):
    return [(start + 7 * i) % 290 for i in range(n)]


def test_next_bucket():
    assert [next_bucket(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert next_bucket(5, 6) == 6
    with pytest.raises(ValueError):
        next_bucket(0, 4)
    with pytest.raises(ValueError):
        next_bucket(5, 4)


@pytest.mark.parametrize("window_extra", [0, 7])
def test_left_padded_rows_match_full_recompute(model, window_extra):
    """Rows of a left-padded batch, one step each: the logits of each sequence alone; keys
    beyond the filled slots (a larger window, as the compiled step reads) change nothing."""
    seqs = [prompt_of(n + 1, start=n) for n in (5, 1, 9)]
    idx, pad = left_pad([s[:-1] for s in seqs], pad_id=0)
    cache = model.new_cache(len(seqs), max_len=CTX, pad=pad)
    with torch.no_grad():
        model.forward_cached(idx, cache)
        width = idx.shape[1]
        slots = torch.full((len(seqs),), width)
        got = decode_logits(model, torch.tensor([s[-1] for s in seqs]), slots, pad,
                            cache.k, cache.v, window=width + 1 + window_extra)  # fmt: skip
        for r, seq in enumerate(seqs):
            want = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
        # the step wrote each row's key at its slot: the next step sees it
        assert bool((cache.k[0][:, :, width] != 0).all())


def test_step_checks_rows_and_room(model):
    step = DecodeStep(model, model.new_cache(2, max_len=8))
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="1..2 rows"):
        step(torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="KV cache full"):
        step(one, torch.tensor([8]), torch.tensor([0]), window=9)
    with pytest.raises(ValueError, match="unknown decode mode"):
        DecodeStep(model, model.new_cache(1, max_len=8), mode="fast")


def test_reused_decoder_gives_the_same_tokens_as_a_fresh_one(model):
    """A session's decoder (one preallocated cache, reused by every call) and generate's
    own per-call one; a batch through the shared cache compacts finished rows in place."""
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    decoder = DecodeStep(model, model.new_cache(4, max_len=CTX + 8))
    prompts = [prompt_of(n, start=n) for n in (3, 11, 1, 7)]
    alone = [generate(model, None, p, cfg, stop_token_ids=[]).token_ids for p in prompts]
    for p, want in zip(prompts, alone, strict=True):
        assert generate(model, None, p, cfg, stop_token_ids=[], decoder=decoder).token_ids == want
    short = SamplingConfig(temperature=0, max_new_tokens=12)
    batch = generate_batch(model, None, prompts, short, stop_token_ids=[], decoder=decoder)
    assert [r.token_ids for r in batch] == alone
    # rows stop at different steps (context): later rows move into the freed rows
    long = [prompt_of(n, start=n) for n in (CTX - 2, 4, CTX - 5, 2)]
    cfg2 = SamplingConfig(temperature=0, max_new_tokens=20)
    batch = generate_batch(model, None, long, cfg2, stop_token_ids=[], decoder=decoder)
    for p, res in zip(long, batch, strict=True):
        assert res.token_ids == generate(model, None, p, cfg2, stop_token_ids=[]).token_ids
    assert [r.new_tokens for r in batch] == [3, 20, 6, 20]


def test_compiled_step_traces_whole_and_gives_the_same_tokens(model):
    """torch.compile traces the step (backend "eager": the trace without code generation,
    which takes minutes on a loaded CI core) over the whole cache: greedy tokens unchanged."""
    cfg = SamplingConfig(temperature=0, max_new_tokens=10)
    prompts = [prompt_of(n, start=n) for n in (4, 9)]
    want = generate_batch(model, None, prompts, cfg, stop_token_ids=[])
    decoder = DecodeStep(model, model.new_cache(2, max_len=CTX + 8), "compile", "eager")
    got = generate_batch(model, None, prompts, cfg, stop_token_ids=[], decoder=decoder)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_compiled_step_does_not_compile_per_batch_size(model):
    """The server's batch size changes every few steps: torch.compile must not compile a
    step per size (one static compile, then one with a symbolic batch dimension for each
    product form: up to FUSED_ROWS rows fused, more as matrix products)."""
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(len(example_inputs))
        return graph_module.forward

    step = DecodeStep(model, model.new_cache(8, max_len=CTX), "compile", counting_backend)
    with torch.inference_mode():
        for n in (1, 3, 5, 8, 2, 7):
            logits = step(torch.ones(n, dtype=torch.long), torch.full((n,), 4),
                          torch.zeros(n, dtype=torch.long), window=5)  # fmt: skip
            assert logits.shape == (n, model.config.vocab_size)
    assert len(compiles) == 3


def test_compiled_step_reads_new_weight_values():
    """The compiled step keeps no guards on the model's modules (their checks cost a tenth
    of a step), but the weights stay inputs: values changed in place after the first
    call change the logits exactly as they change the eager step's."""
    m = tiny_model(300, backend="torch", n_heads=4, d_ff=64, max_seq_len=CTX, init_std=0.3)
    compiled = DecodeStep(m, m.new_cache(1, max_len=CTX), "compile", "eager")
    eager = DecodeStep(m, m.new_cache(1, max_len=CTX))
    tok, pad = torch.tensor([7]), torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        compiled(tok, torch.tensor([0]), pad, window=1)
        eager(tok, torch.tensor([0]), pad, window=1)  # the same slot 0 in both caches
        before = compiled(tok, torch.tensor([1]), pad, window=2)
        m.blocks[0].ffn.down.weight.mul_(3.0)
        m.norm.weight.add_(0.5)
        after = compiled(tok, torch.tensor([1]), pad, window=2)
        want = eager(tok, torch.tensor([1]), pad, window=2)
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    assert float((after - before).abs().max()) > 1e-2


def test_compiled_steps_of_two_models_keep_their_own_graphs():
    """Without module guards, each compiled step must own its graphs: a second model of
    another structure (int8 layers) and layout (column-major) decodes as it does eagerly."""
    from tritonlm.engine.model.inference_weights import prepare_inference_weights

    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    a = tiny_model(300, backend="torch", n_heads=4, d_ff=64, max_seq_len=CTX, init_std=0.3)
    b = tiny_model(300, backend="torch", n_heads=4, d_ff=64, max_seq_len=CTX, init_std=0.3)
    prepare_inference_weights(b, "int8")  # int8 and column-major: another graph entirely
    for m in (a, b, a):
        want = generate(m, None, prompt_of(5), cfg, stop_token_ids=[])
        step = DecodeStep(m, m.new_cache(1, max_len=CTX), "compile", "eager")
        got = generate(m, None, prompt_of(5), cfg, stop_token_ids=[], decoder=step)
        assert got.token_ids == want.token_ids


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_one_query_attention_compiled_and_eager_match_float64(hkv):
    """Compiled (on the CPU: product-softmax-product, traced) and eager (SDPA) attention of
    one query over masked keys, grouped-query included, against a float64 reference."""
    from tritonlm.engine.model.decode_step import one_query_attention

    torch.manual_seed(hkv)
    B, H, W, Dh = 3, 4, 13, 16
    q, k, v = torch.randn(B, H, Dh), torch.randn(B, hkv, W, Dh), torch.randn(B, hkv, W, Dh)
    keep = torch.rand(B, W) < 0.6
    keep[:, 0] = True  # every row sees at least one key
    mask = keep[:, None, None]
    kk = k.double().repeat_interleave(H // hkv, dim=1)  # head h reads key head h // (H/Hkv)
    vv = v.double().repeat_interleave(H // hkv, dim=1)
    s = torch.einsum("bhd,bhwd->bhw", q.double(), kk) / Dh**0.5
    p = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    want = torch.einsum("bhw,bhwd->bhd", p, vv)
    compiled = torch.compile(one_query_attention, backend="eager", fullgraph=True)
    for fn in (one_query_attention, compiled):
        got = fn(q, k, v, mask)
        assert got.shape == (B, H, Dh)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_linear_rows_fuses_only_compiled_few_row_products():
    """linear_rows: under compile (CPU, <= FUSED_ROWS rows, plain bias-free Linear) the
    multiply-and-sum, else the layer itself; both equal the layer's output."""
    from tritonlm.engine.model.row_products import FUSED_ROWS, fuse_rows, linear_rows

    torch.manual_seed(3)
    layer = torch.nn.Linear(21, 17, bias=False)
    seen = []

    def probe(x):
        seen.append(fuse_rows(x))
        return linear_rows(layer, x)

    compiled = torch.compile(probe, backend="eager", fullgraph=True)
    with torch.no_grad():
        for rows in (1, FUSED_ROWS, FUSED_ROWS + 3):
            x = torch.randn(rows, 21)
            torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(probe(x), layer(x))
    assert seen == [True, False, True, False, False, False]
