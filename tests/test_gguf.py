"""GGUF export, read back with the format's own reader (``gguf.GGUFReader``).

Every metadata key is compared with the model and tokenizer it came from, every tensor
with our weight after undoing the split and the q/k row permutation (written here
independently of the exporter), and a llama-style forward pass in numpy over the file's
tensors (neighbour-pair RoPE, as llama.cpp's ``llama`` graph does) must give our logits.
llama.cpp itself is exercised by benchmarks/verify_llamacpp.py.
"""

import math
import os

import gguf
import jinja2
import numpy as np
import pytest
import regex
import torch
from factories import tiny_model, tiny_tokenizer
from gguf import GGMLQuantizationType as QT
from tritonlm.engine.interop.byte_level import str_to_token, token_to_str
from tritonlm.engine.interop.gguf_export import export_gguf
from tritonlm.engine.interop.gguf_vocab import GGUFExportError
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import GPT4_PATTERN, BpeTokenizerConfig

TEXTS = [
    "the quick brown fox jumps over the lazy dog. ",
    "Hello, world! It's 2024 and we're testing 12345 tokens.\n\n",
    "naïve café ünïcode ✓ 中文 — done",
] * 4


BASE = dict(d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=48)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TEXTS, vocab_size=330)


def make_model(tok, **shape):
    model = tiny_model(tok, BASE, backend="torch", **shape)
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


# Multi-head with tied embeddings, and grouped-query attention with an untied head.
SHAPES = {"mha_tied": dict(), "gqa_untied": dict(n_kv_heads=2, tie_embeddings=False)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model(request, tok):
    return make_model(tok, **SHAPES[request.param])


def export(model, tok, tmp_path, dtype):
    path = tmp_path / f"m-{dtype}.gguf"
    export_gguf(model, tok, path, dtype)
    return gguf.GGUFReader(path)


def field(reader, key):
    return reader.fields[key].contents()


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def as_float(t) -> np.ndarray:
    """A reader tensor as float32 [rows, cols] (numpy order), dequantized if needed."""
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type in (QT.F32, QT.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved rows (2i, 2i+1) of each head back to halves (i, i + D/2)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def ours_from_file(reader, cfg) -> dict[str, np.ndarray]:
    """Rebuild our state dict (fused qkv and gate_up, rotate-half q/k) from the file."""
    t = {name: as_float(x) for name, x in tensors(reader).items()}
    sd = {"tok_emb.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"]}
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    for i in range(cfg.n_layers):
        b, p = f"blk.{i}.", f"blocks.{i}."
        q = unpermute(t[b + "attn_q.weight"], cfg.n_heads)
        k = unpermute(t[b + "attn_k.weight"], cfg.n_kv_heads)
        sd[p + "attn.qkv.weight"] = np.concatenate([q, k, t[b + "attn_v.weight"]])
        sd[p + "attn.proj.weight"] = t[b + "attn_output.weight"]
        sd[p + "attn_norm.weight"] = t[b + "attn_norm.weight"]
        sd[p + "ffn_norm.weight"] = t[b + "ffn_norm.weight"]
        sd[p + "ffn.gate_up.weight"] = np.concatenate(
            [t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]]
        )
        sd[p + "ffn.down.weight"] = t[b + "ffn_down.weight"]
    return sd


# ----------------------------------------------------------------------------- metadata


def test_every_metadata_key(model, tok, tmp_path):
    cfg = model.config
    r = export(model, tok, tmp_path, "f16")
    expected = {
        "general.architecture": "llama",
        "general.name": "m-f16",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.vocab_size": tok.vocab_size,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.d_model,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.d_ff,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": np.float32(cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": np.float32(cfg.norm_eps),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": tok.end_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    # the arrays and the chat template have tests of their own below
    assert set(r.fields) - header == set(expected) | arrays | {"tokenizer.chat_template"}


def test_tokens_and_types_are_the_tokenizers(tok, tmp_path):
    r = export(make_model(tok), tok, tmp_path, "f32")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    specials = {i: name for name, i in tok.special_tokens.items()}
    assert len(tokens) == len(types) == tok.vocab_size
    for i, (s, ty) in enumerate(zip(tokens, types, strict=True)):
        if i in specials:
            assert (s, ty) == (specials[i], gguf.TokenType.CONTROL)
        else:  # byte-level string of exactly this id's bytes
            assert (str_to_token(s), ty) == (tok.token_bytes(i), gguf.TokenType.NORMAL)


def pair_rank_bpe(tokens: list[str], merges: list[str], pieces: list[str]) -> list[int]:
    """llama.cpp's gpt2 tokenizer with ignore_merges ('llama-bpe') on pre-split pieces:
    a piece that is a token is taken whole; otherwise merge the adjacent listed pair of
    lowest list position (leftmost first) until none is listed."""
    index = {s: i for i, s in enumerate(tokens)}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    out = []
    for piece in pieces:
        syms = list(token_to_str(piece.encode("utf-8")))
        if "".join(syms) in index:
            out.append(index["".join(syms)])
            continue
        while True:
            pairs = enumerate(zip(syms[:-1], syms[1:], strict=True))
            ranked = [(rank.get(p, math.inf), i) for i, p in pairs]
            best, i = min(ranked, default=(math.inf, 0))
            if best == math.inf:
                break
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        out += [index[s] for s in syms]
    return out


def test_merges_make_llama_cpps_bpe_give_our_ids(tok, tmp_path):
    r = export(make_model(tok), tok, tmp_path, "f32")
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    assert " " not in "".join(m.replace(" ", "", 1) for m in merges)  # one separator each
    split = regex.compile(GPT4_PATTERN).findall
    texts = TEXTS + ["The lazy dogs' café: 1234567 tokens!!\n\t  ok", "ünïcode✓✓ 中文中文"]
    for text in texts:
        assert pair_rank_bpe(tokens, merges, split(text)) == tok.encode(text), text


def test_chat_template_renders_our_chat_format(tok, tmp_path):
    r = export(make_model(tok), tok, tmp_path, "f32")
    template = jinja2.Environment().from_string(field(r, "tokenizer.chat_template"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, world!"},
        {"role": "assistant", "content": "It's 2024."},
        {"role": "user", "content": "naïve?"},
    ]
    text = template.render(messages=messages, add_generation_prompt=True, bos_token="<|bos|>")
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    assert tok.encode(text, allowed_special="all") == ids


def test_larger_model_vocabulary_gets_unused_placeholders(tok, tmp_path):
    model = make_model(tok, vocab_size=tok.vocab_size + 3)
    r = export(model, tok, tmp_path, "f32")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == field(r, "llama.vocab_size") == tok.vocab_size + 3
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3
    assert len(set(tokens)) == len(tokens)


# ----------------------------------------------------------------------------- tensors


def test_f32_tensors_equal_ours_exactly(model, tok, tmp_path):
    r = export(model, tok, tmp_path, "f32")
    assert all(t.tensor_type == QT.F32 for t in r.tensors)
    assert ("output.weight" in tensors(r)) == (not model.config.tie_embeddings)
    got = ours_from_file(r, model.config)
    sd = model.state_dict()
    assert sorted(got) == sorted(sd)
    for name, w in sd.items():
        assert np.array_equal(got[name], w.numpy()), name


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_tensors_equal_the_cast(model, tok, tmp_path, dtype):
    r = export(model, tok, tmp_path, dtype)
    want_type = {"f16": QT.F16, "bf16": QT.BF16}[dtype]
    for t in r.tensors:  # matrices cast, norm weights kept in float32
        assert t.tensor_type == (QT.F32 if len(t.shape) == 1 else want_type), t.name
    got = ours_from_file(r, model.config)
    cast = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, w in model.state_dict().items():
        want = w if w.dim() == 1 else w.to(cast).float()
        assert np.array_equal(got[name], want.numpy()), name


def test_q8_0_within_its_block_error(model, tok, tmp_path):
    r = export(model, tok, tmp_path, "q8_0")
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    got = ours_from_file(r, model.config)
    for name, w in model.state_dict().items():
        w = w.numpy()
        if w.ndim == 1:
            assert np.array_equal(got[name], w), name
            continue
        # q8_0: blocks of 32 along a row, scale d = max|x| / 127 stored as f16, x ~ q * d,
        # so |error| <= d/2 (rounding q) + 127 * |d - f16(d)| (<= 127 * d * 2**-11)
        blocks = w.reshape(w.shape[0], -1, 32)
        d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
        err = np.abs(got[name].reshape(blocks.shape) - blocks)
        assert (err <= d * (0.5 + 127 * 2.0**-11) + 1e-12).all(), name
        assert err.max() > 0, name  # it really was quantized


def test_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32(tok, tmp_path):
    model = make_model(tok, d_model=48, n_heads=2, d_ff=64)  # rows of 48 (and 64) values
    r = export(model, tok, tmp_path, "q8_0")
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == QT.Q8_0  # rows of d_ff = 64 values
    assert types["blk.0.attn_q.weight"] == QT.F16  # rows of d_model = 48 values
    assert types["token_embd.weight"] == QT.F16


# ----------------------------------------------------------------------------- semantics


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_neighbours(x, base):
    """llama.cpp's 'normal' RoPE on x [T, H, D]: rotate pairs (2i, 2i+1) by pos * base^(-2i/D)."""
    T, _, D = x.shape
    ang = np.arange(T)[:, None] * base ** (-np.arange(0, D, 2) / D)  # [T, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def llama_forward(reader, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of a llama-architecture GGUF file, computed from its metadata and
    tensors alone, the way llama.cpp's llama graph does (float64)."""
    f = lambda k: field(reader, "llama." + k)  # noqa: E731
    t = {n: as_float(x).astype(np.float64) for n, x in tensors(reader).items()}
    H, Hkv, eps = (
        f("attention.head_count"),
        f("attention.head_count_kv"),
        f("attention.layer_norm_rms_epsilon"),
    )
    base, T = f("rope.freq_base"), len(ids)
    x = t["token_embd.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(f("block_count")):
        b = f"blk.{i}."
        h = _rms(x, t[b + "attn_norm.weight"], eps)
        q = (h @ t[b + "attn_q.weight"].T).reshape(T, H, -1)
        k = (h @ t[b + "attn_k.weight"].T).reshape(T, Hkv, -1)
        v = (h @ t[b + "attn_v.weight"].T).reshape(T, Hkv, -1)
        q, k = _rope_neighbours(q, base), _rope_neighbours(k, base)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1]) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", p, v).reshape(T, -1)
        x = x + y @ t[b + "attn_output.weight"].T
        h = _rms(x, t[b + "ffn_norm.weight"], eps)
        g, u = h @ t[b + "ffn_gate.weight"].T, h @ t[b + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[b + "ffn_down.weight"].T
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def test_llama_style_forward_of_the_file_gives_our_logits(model, tok, tmp_path):
    r = export(model, tok, tmp_path, "f32")
    ids = [tok.bos_id, *tok.encode("the quick brown fox, naïve café")]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    theirs = llama_forward(r, ids)
    assert np.abs(theirs - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
    # the permutation matters: without it the same tensors give other logits
    q = tensors(r)["blk.0.attn_q.weight"]
    assert not np.array_equal(
        as_float(q), model.state_dict()["blocks.0.attn.qkv.weight"][:64].numpy()
    )


# ----------------------------------------------------------------------------- refusals


def _refused(model, tok, path, dtype="f16") -> str:
    with pytest.raises(GGUFExportError) as e:
        export_gguf(model, tok, path, dtype)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_are_one_line_and_write_nothing(tok, tmp_path):
    path = tmp_path / "m.gguf"
    model = make_model(tok)
    assert "choose one of f32, f16, bf16, q8_0" in _refused(model, tok, path, "q4_k")
    ascii_tok = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300, normalization="ascii"))
    assert "llama.cpp does not normalize" in _refused(make_model(ascii_tok), ascii_tok, path)
    pat_tok = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300, pattern=r"\w+|\W"))
    assert "custom pre-tokenizer pattern" in _refused(make_model(pat_tok), pat_tok, path)
    # a user special token whose text is an ordinary token's text ("a" is byte 97)
    clash = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300, special_tokens=("a",)))
    assert "looks tokens up by text" in _refused(make_model(clash), clash, path)
    small = make_model(tok, vocab_size=tok.vocab_size - 1)
    assert "embeddings" in _refused(small, tok, path)
    assert "is a directory" in _refused(model, tok, tmp_path)
    assert "does not exist" in _refused(model, tok, tmp_path / "no" / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tok, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF old")  # a GGUF (its magic): may be replaced

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(GGUFExportError, match=f"cannot write {path}: disk full"):
        export_gguf(make_model(tok), tok, path, "f32")
    assert path.read_bytes() == b"GGUF old"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_llm_export_reports_a_refusal_in_one_line(tmp_path, capsys):
    from tritonlm.cli.export import main
    from tritonlm.engine.checkpoint.save_load import save_checkpoint

    ascii_tok = BpeTokenizer.train(TEXTS, BpeTokenizerConfig(vocab_size=300, normalization="ascii"))
    save_checkpoint(tmp_path / "ckpt", make_model(ascii_tok), ascii_tok)
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llm-export: error: tokenizer normalization")
    assert not (tmp_path / "m.gguf").exists()
