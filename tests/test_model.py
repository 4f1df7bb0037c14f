"""ModelConfig validation and presets; Transformer forward, loss, padding, KV cache parity."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_model
from tritonlm.engine.model.config import PRESETS, ConfigError, ModelConfig
from tritonlm.engine.model.kv_cache import KVCache, left_pad
from tritonlm.engine.model.transformer import Transformer

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=24)
tiny = partial(tiny_model, TINY["vocab_size"], TINY)  # tiny(seed=1, n_kv_heads=2)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=-8), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=0), "n_heads"),
        (dict(d_ff=0), "d_ff"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(d_model=12, n_heads=4), "even"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(init_std=-1.0), "init_std"),
        (dict(d_model=32.0), "d_model"),
        (dict(n_layers=True), "n_layers"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_config_rejects_bad_values(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**TINY, **change})


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = ModelConfig(**TINY, dropout=0.1, tie_embeddings=False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config key.*n_embd"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})
    with pytest.raises(ConfigError, match="missing vocab_size"):
        ModelConfig.from_dict({"d_model": 32})
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dict([1, 2])
    assert cfg.replace(d_ff=64).d_ff == 64
    with pytest.raises(ConfigError):
        cfg.replace(n_heads=3)


def test_presets():
    seed = ModelConfig.preset("seed", vocab_size=300)
    assert (seed.d_model, seed.d_ff, seed.n_layers, seed.n_heads, seed.max_seq_len) == (
        128,
        256,
        3,
        4,
        80,
    )
    assert seed.vocab_size == 300
    assert ModelConfig.preset("small", 8192, dropout=0.1).dropout == 0.1
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge", 100)
    assert set(PRESETS) == {"seed", "small", "gpt2"}


def meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("vocab", [8192, 12288, 16384])
def test_small_preset_is_about_10m_params(vocab):
    cfg = ModelConfig.preset("small", vocab)
    n = meta_model(cfg).num_parameters()
    assert n == cfg.num_parameters()
    assert 8.5e6 <= n <= 11.5e6, n
    assert cfg.max_seq_len == 256


def test_gpt2_preset_is_about_124m_params():
    cfg = ModelConfig.preset("gpt2", 50257)
    n = meta_model(cfg).num_parameters()
    assert n == cfg.num_parameters() == 123_551_232
    assert abs(n - 124e6) < 1.5e6
    assert cfg.max_seq_len == 1024 and cfg.tie_embeddings


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_matches_formula(tie):
    m = tiny(tie_embeddings=tie)
    by_hand = sum(p.numel() for p in m.parameters())  # parameters() de-duplicates ties
    assert m.num_parameters() == by_hand == m.config.num_parameters()
    emb = TINY["vocab_size"] * TINY["d_model"] * (1 if tie else 2)
    assert m.num_parameters(exclude_embeddings=True) == by_hand - emb
    assert (m.lm_head is None) == tie
    names = set(m.state_dict())
    assert ("lm_head.weight" in names) != tie
    assert not any("rope" in n for n in names), "RoPE tables must not be saved"


def test_flops_per_token():
    m = tiny()
    c = m.config
    n = c.n_layers * (4 * c.d_model**2 + 3 * c.d_model * c.d_ff) + c.vocab_size * c.d_model
    assert m.flops_per_token(10) == 6 * n + 12 * c.n_layers * c.d_model * 10
    assert m.flops_per_token() == m.flops_per_token(c.max_seq_len)


def test_scaled_init():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=8, n_heads=4, d_ff=256)
    m = Transformer(cfg)
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(m.blocks[0].ffn.down.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(m.blocks[3].attn.proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert torch.equal(m.norm.weight, torch.ones(128))


# ----------------------------------------------------------------------------- forward / loss


def test_forward_shape_and_backend_setter():
    m = tiny()
    idx = torch.randint(0, 61, (2, 7))
    assert m(idx).shape == (2, 7, 61)
    m.backend = "torch"
    assert m.blocks[1].attn.backend == "torch" and m.norm.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        m.backend = "cuda"
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_causal_future_tokens_do_not_change_past_logits():
    m = tiny()
    idx = torch.randint(0, 61, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 61
    a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_right_padding_with_lengths_equals_alone():
    m = tiny()
    seqs = [torch.randint(0, 61, (n,)) for n in (9, 4, 1)]
    batch = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
        batch[i, len(s) :] = 7  # garbage in the padding
    lengths = torch.tensor([9, 4, 1])
    out = m(batch, lengths=lengths)
    for i, s in enumerate(seqs):
        alone = m(s[None])
        torch.testing.assert_close(out[i, : len(s)], alone[0], rtol=1e-5, atol=1e-5)
    # The loss over the padded batch is the token-weighted mean of the per-sequence losses.
    targets = torch.randint(0, 61, (3, 9))
    total = sum(
        F.cross_entropy(m(s[None])[0], targets[i, : len(s)], reduction="sum")
        for i, s in enumerate(seqs)
    )
    torch.testing.assert_close(m.loss(batch, targets, lengths=lengths), total / 14)


def test_left_padding_forward_equals_alone():
    m = tiny()
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (6, 2, 4)]
    idx, pad = left_pad(prompts, pad_id=0)
    assert pad.tolist() == [0, 4, 2]
    out = m(idx, pad=pad)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(out[i, pad[i] :], m(torch.tensor([p]))[0], rtol=1e-5, atol=1e-5)


def test_loss_matches_cross_entropy_and_masks():
    m = tiny(tie_embeddings=False)
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    logits = m(idx)
    ref = F.cross_entropy(logits.reshape(-1, 61), targets.reshape(-1))
    torch.testing.assert_close(m.loss(idx, targets), ref)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, 3:6] = 1
    mask[1, 9] = 1
    sel = mask.bool()
    torch.testing.assert_close(
        m.loss(idx, targets, loss_mask=mask), F.cross_entropy(logits[sel], targets[sel])
    )
    ignored = targets.clone()
    ignored[:, :5] = -100
    torch.testing.assert_close(
        m.loss(idx, ignored), F.cross_entropy(logits[:, 5:].reshape(-1, 61), targets[:, 5:].ravel())
    )
    assert m.loss(idx, targets, loss_mask=torch.zeros(2, 10)).item() == 0.0


def test_backward_reaches_every_parameter():
    m = tiny(tie_embeddings=False).train()
    idx = torch.randint(0, 61, (2, 8))
    m.loss(idx, torch.roll(idx, -1, 1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_only_in_train_mode():
    m = tiny(dropout=0.5)
    idx = torch.randint(0, 61, (1, 8))
    torch.testing.assert_close(m(idx), m(idx), rtol=0, atol=0)
    m.train()
    assert not torch.equal(m(idx), m(idx))


# ----------------------------------------------------------------------------- KV cache


def greedy_uncached(m: Transformer, prompt: list[int], steps: int):
    ids, logits = list(prompt), []
    for _ in range(steps):
        last = m(torch.tensor([ids]))[0, -1]
        logits.append(last)
        ids.append(int(last.argmax()))
    return ids[len(prompt) :], torch.stack(logits)


def greedy_cached(m: Transformer, prompts: list[list[int]], steps: int):
    idx, pad = left_pad(prompts, pad_id=0)
    cache = m.new_cache(len(prompts), pad=pad)
    last = m.forward_cached(idx, cache)[:, -1]
    out, logits = [], []
    for step in range(steps):
        logits.append(last)
        nxt = last.argmax(-1)
        out.append(nxt)
        if step + 1 < steps:
            last = m.forward_cached(nxt[:, None], cache)[:, -1]
    return torch.stack(out, 1).tolist(), torch.stack(logits, 1)


@pytest.mark.parametrize("prompt_len", [1, 5, 17])
def test_cache_greedy_matches_recompute_up_to_context_limit(prompt_len):
    m = tiny(seed=1)
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, 61, (prompt_len,)).tolist()
    steps = m.config.max_seq_len - prompt_len  # the last step's input fills the context
    ref_tokens, ref_logits = greedy_uncached(m, prompt, steps)
    tokens, logits = greedy_cached(m, [prompt], steps)
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-5, atol=1e-5)


def test_cache_batched_left_padding_matches_alone():
    m = tiny(seed=2)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 11, 1, 7)]
    steps = 10
    tokens, logits = greedy_cached(m, prompts, steps)
    for i, p in enumerate(prompts):
        ref_tokens, ref_logits = greedy_uncached(m, p, steps)
        assert tokens[i] == ref_tokens, i
        torch.testing.assert_close(logits[i], ref_logits, rtol=1e-5, atol=1e-5)


def test_cache_each_row_can_reach_the_context_limit():
    m = tiny(seed=4)
    prompts = [[1, 2, 3, 4, 5, 6], [7]]
    # The short row may generate until its own real length hits max_seq_len.
    steps = m.config.max_seq_len - 1
    idx, pad = left_pad(prompts, pad_id=0)
    cache = m.new_cache(2, pad=pad)
    assert cache.max_len == m.config.max_seq_len + 5
    m.forward_cached(idx, cache)
    for _ in range(m.config.max_seq_len - 6):
        m.forward_cached(torch.tensor([[3], [3]]), cache)
    assert cache.pos == m.config.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward_cached(torch.tensor([[3], [3]]), cache)  # row 0 is at the limit
    tokens, _ = greedy_cached(m, [[7]], steps)
    ref, _ = greedy_uncached(m, [7], steps)
    assert tokens[0] == ref


def test_cache_errors_and_reset():
    m = tiny()
    cache = m.new_cache(1, max_len=4)
    assert isinstance(cache, KVCache) and len(cache.k) == m.config.n_layers
    assert cache.k[0].shape == (1, 4, 4, 8)
    m.forward_cached(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="cache full"):
        m.forward_cached(torch.tensor([[1, 2]]), cache)
    with pytest.raises(ValueError, match="batch"):
        m.forward_cached(torch.tensor([[1], [2]]), cache)
    cache.reset()
    a = m.forward_cached(torch.tensor([[5, 6]]), cache)
    torch.testing.assert_close(a, m(torch.tensor([[5, 6]])), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pad"):
        m.new_cache(2, pad=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)


def test_cache_rows_fill_a_row_range_of_the_shared_buffers():
    m = tiny(seed=3)
    cache = m.new_cache(4, max_len=8)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = m.forward_cached(idx, cache.rows(1, 2))  # rows 1 and 2 only
    torch.testing.assert_close(got, m(idx), rtol=1e-5, atol=1e-5)
    for t in (*cache.k, *cache.v):
        assert t[1:3, :, :3].abs().sum() > 0  # written in place...
        assert not t[[0, 3]].any() and not t[:, :, 3:].any()  # ...and nowhere else
    for first, n in [(3, 2), (-1, 1), (0, 0)]:
        with pytest.raises(ValueError, match="outside"):
            cache.rows(first, n)


def test_model_device_follows_its_weights():
    m = tiny()
    assert m.device == torch.device("cpu")
    assert m.to("meta").device.type == "meta"


def test_forward_cached_needs_no_grad():
    m = tiny().train()
    cache = m.new_cache(1)
    out = m.forward_cached(torch.tensor([[1, 2]]), cache)
    assert not out.requires_grad and not cache.k[0].requires_grad
    assert math.isfinite(out.sum().item())


def test_triton_backend_matches_torch_end_to_end():
    """The kernel seam: the same model on backend "triton" (interpreter on CPU) agrees
    with backend "torch" on logits, loss and every gradient, with right padding."""
    m = tiny(seed=5, n_heads=1, max_seq_len=16)  # head dim 32: a kernel head dim
    idx, targets = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 9))
    lengths = torch.tensor([9, 5])
    results = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        loss = m.loss(idx, targets, lengths=lengths)
        loss.backward()
        logits = m(idx, lengths=lengths).detach()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        results[backend] = (loss.detach(), logits, grads)
    (l0, g0, d0), (l1, g1, d1) = results["torch"], results["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[0], g0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[1, :5], g0[1, :5], rtol=1e-5, atol=1e-5)
    for name in d0:
        torch.testing.assert_close(d1[name], d0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cache_in_lower_precision_and_bf16_model():
    m = tiny(seed=6)
    idx = torch.randint(0, 61, (1, 6))
    cache = m.new_cache(1, dtype=torch.bfloat16)
    out = m.forward_cached(idx, cache)
    assert cache.k[0].dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, m(idx), rtol=0.05, atol=0.05)
    m16 = tiny(seed=6).to(torch.bfloat16)
    assert m16.rope_cos.dtype == torch.float32 and "rope_cos" in dict(m16.named_buffers())
    out16 = m16.forward_cached(idx, m16.new_cache(1))
    assert out16.dtype == torch.bfloat16
    assert torch.isfinite(m16.loss(idx, idx)).item()


# ----------------------------------------------------------------------------- grouped-query


def test_n_kv_heads_defaults_to_n_heads_and_must_divide_them():
    cfg = ModelConfig(**TINY)
    assert cfg.n_kv_heads == cfg.n_heads == 4 and cfg.to_dict()["n_kv_heads"] == 4
    old = {k: v for k, v in cfg.to_dict().items() if k != "n_kv_heads"}  # a pre-GQA config
    assert ModelConfig.from_dict(old) == cfg
    assert ModelConfig(**TINY, n_kv_heads=2).kv_dim == 16
    with pytest.raises(ConfigError, match="multiple of `n_kv_heads`"):
        ModelConfig(**TINY, n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(**TINY, n_kv_heads=0)
    # without GQA the fused projection keeps its pre-GQA name and shape
    shapes = {n: tuple(p.shape) for n, p in meta_model(cfg).state_dict().items()}
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 32, 32)


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_parameter_count_and_cache_shape(kv):
    m = tiny(n_kv_heads=kv, tie_embeddings=False)
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    assert m.num_parameters() == m.config.num_parameters()
    assert m.blocks[0].attn.qkv.weight.shape == (32 + 2 * kv * 8, 32)
    c = m.config
    n = c.n_layers * (2 * 32 * 32 + 2 * 32 * kv * 8 + 3 * 32 * 48) + 61 * 32
    assert m.flops_per_token(10) == 6 * n + 12 * c.n_layers * 32 * 10
    cache = m.new_cache(3, max_len=5)
    assert cache.k[0].shape == cache.v[1].shape == (3, kv, 5, 8)


def expanded_to_mha(m: Transformer) -> Transformer:
    """The multi-head model that computes the same function as the GQA model ``m``: each
    key/value head's weights repeated for every query head of its group."""
    c = m.config
    full = Transformer(c.replace(n_kv_heads=c.n_heads)).eval()
    group, d = c.n_heads // c.n_kv_heads, c.d_model
    state = dict(m.state_dict())
    for i in range(c.n_layers):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split((d, c.kv_dim, c.kv_dim))

        def rep(w):
            return w.view(c.n_kv_heads, 1, c.head_dim, d).expand(-1, group, -1, -1).reshape(d, d)

        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, rep(k), rep(v)))
    full.load_state_dict(state)
    return full


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_equals_multi_head_attention_with_repeated_kv(kv):
    m = tiny(seed=7, n_kv_heads=kv)
    full = expanded_to_mha(m)
    idx = torch.randint(0, 61, (2, 12))
    lengths = torch.tensor([12, 7])
    torch.testing.assert_close(m(idx), full(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        m(idx, lengths=lengths)[1, :7], full(idx, lengths=lengths)[1, :7], rtol=1e-5, atol=1e-5
    )
    pad = torch.tensor([0, 4])
    torch.testing.assert_close(m(idx, pad=pad), full(idx, pad=pad), rtol=1e-5, atol=1e-5)


def test_gqa_cache_matches_recompute_and_batch_matches_alone():
    m = tiny(seed=8, n_kv_heads=2)
    torch.manual_seed(9)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 9, 1)]
    tokens, logits = greedy_cached(m, prompts, 8)
    for i, p in enumerate(prompts):
        ref_tokens, ref_logits = greedy_uncached(m, p, 8)
        alone_tokens, _ = greedy_cached(m, [p], 8)
        assert tokens[i] == ref_tokens == alone_tokens[0], i
        torch.testing.assert_close(logits[i], ref_logits, rtol=1e-5, atol=1e-5)


def test_gqa_model_trains():
    m = tiny(seed=10, n_kv_heads=1).train()
    m.backend = "torch"
    idx = torch.randint(0, 61, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = m.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_gqa_triton_backend_matches_torch():
    """Grouped-query attention through the kernel seam: Triton (interpreter on CPU) and
    torch agree on the loss and every gradient, k/v projections included."""
    m = tiny(seed=11, d_model=64, n_heads=2, n_kv_heads=1, max_seq_len=16)  # head dim 32
    idx, targets = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 9))
    lengths = torch.tensor([9, 6])
    results = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        loss = m.loss(idx, targets, lengths=lengths)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    (l0, d0), (l1, d1) = results["torch"], results["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for name in d0:
        torch.testing.assert_close(d1[name], d0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_written_before_n_kv_heads_existed_still_loads(tmp_path):
    """config.json of checkpoints saved before grouped-query attention has no n_kv_heads:
    it loads as the same multi-head model, with the same weights and logits."""
    import hashlib
    import json

    from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

    tok = BpeTokenizer.train(["an old checkpoint, an old config"] * 3, BpeTokenizerConfig(300))
    m = tiny(seed=12, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "old", m, tok)
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["model_config"]["n_kv_heads"]  # as every checkpoint before the field
    path.write_text(json.dumps(cfg))
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    data = path.read_bytes()
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"]["config.json"] = entry
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_checkpoint(tmp_path / "old", backend="torch")
    assert loaded.model.config.n_kv_heads == loaded.model.config.n_heads == 4
    assert loaded.model.config == m.config
    idx = torch.randint(0, tok.vocab_size, (1, 10))
    assert torch.equal(loaded.model(idx), m(idx))
