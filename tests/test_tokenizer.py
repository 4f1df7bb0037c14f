"""Tests for engine/tokenizer.py: our byte-level BPE (training, encoding, files, chat)."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonlm.engine.tokenizer.bpe_tokenizer import FORMAT_NAME, FORMAT_VERSION, BpeTokenizer
from tritonlm.engine.tokenizer.bpe_trainer import learn_merges, words_from_counts
from tritonlm.engine.tokenizer.tokenizer_config import (
    GPT4_PATTERN,
    SPECIAL_TOKENS,
    BpeTokenizerConfig,
    TokenizerError,
    compile_pattern,
)

REPO = Path(__file__).resolve().parents[1]
N_SPECIAL = len(SPECIAL_TOKENS)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "Tokenizers split text into pieces; BPE merges frequent pairs of bytes.",
    "def main(argv=None):\n    return 0  # done\n\n\n",
    "Él está aquí: café, niño, acción. ¿Qué tal?",
    "Straße, Größe, Äpfel und Öl — schön!",
    "Ça va très bien, merci. L'été est là.",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Γειά σου κόσμε! Ελληνικά γράμματα.",
    "中文分词很有意思。我们今天学习字节对编码。",
    "日本語のテキストも大丈夫です。ひらがなとカタカナ。",
    "한국어 문장도 넣어 봅시다. 안녕하세요!",
    "مرحبا بالعالم، هذا نص عربي.",
    "שלום עולם, זה טקסט בעברית.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "Emoji: 😀😃😄 👍🏽 👩‍👩‍👧 🇫🇷 ❤️ ✨",
    "Numbers 1234567 3.14159 0xFF 1e-9 and tabs\tand  double  spaces   here.",
    "Combining: e\u0301 a\u0308 o\u0302 n\u0303 (decomposed) vs é ä ô ñ (composed).",
    "Controls: \x00\x01\x07\x1b[0m\r\n\x7f end.",
    "<|bos|> is special, <|end|> too, but only when allowed.",
]


def make_corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    """A deterministic multilingual corpus: shuffled sentence fragments and numbers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_lines):
        parts = [rng.choice(SENTENCES) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.3:
            parts.append(str(rng.randint(0, 10**9)))
        out.append(" ".join(parts))
    return out


def data_texts() -> list[str]:
    """Whatever exists under data/ right now (another helper may still be writing it)."""
    texts = []
    for path in sorted(glob.glob(str(REPO / "data" / "**" / "*"), recursive=True)):
        if not os.path.isfile(path):
            continue
        raw = Path(path).read_bytes().decode("utf-8", errors="replace")
        try:
            obj = json.loads(raw)
        except ValueError:
            texts.append(raw)
            continue
        if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
            texts.extend(obj)
        else:
            texts.append(raw)
    return texts


@pytest.fixture(scope="module")
def tok() -> BpeTokenizer:
    return BpeTokenizer.train(make_corpus(), BpeTokenizerConfig(vocab_size=1200))


def tiktoken_of(t: BpeTokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="tritonlm_test",
        pat_str=t.config.pattern,
        mergeable_ranks=t.mergeable_ranks(),
        special_tokens=t.special_tokens,
    )


# ------------------------------------------------------------------ training rule


def test_wikipedia_example_follows_tie_rule():
    # "aaabdaaabac": pairs aa=4 -> merge (97,97)->256. Word: 256 a b d 256 a b a c.
    # Now (97,98)=2 and (256,97)=2 tie; the smaller pair (97,98) wins -> 257.
    # Word: 256 257 d 256 257 a c; (256,257)=2 is the max -> 258.
    cfg = BpeTokenizerConfig(vocab_size=256 + 3 + N_SPECIAL)
    t = BpeTokenizer.train(["aaabdaaabac"], cfg)
    assert t.merges == [(97, 97), (97, 98), (256, 257)]
    assert t.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert t.token_bytes(258) == b"aaab"
    assert t.vocab_size == 256 + 3 + N_SPECIAL
    assert t.bos_id == 259 and t.end_id == 265
    assert t.special_tokens == {name: 259 + i for i, name in enumerate(SPECIAL_TOKENS)}


def test_ties_broken_by_smallest_pair_not_first_seen():
    # every pair occurs once: "zy" is seen first but (97,98) "ab" is the smallest pair
    cfg = BpeTokenizerConfig(vocab_size=256 + 1 + N_SPECIAL, min_frequency=1)
    t = BpeTokenizer.train(["zy\nab"], cfg)
    assert t.merges == [(97, 98)]


def test_min_frequency_stops_training_early():
    cfg = BpeTokenizerConfig(vocab_size=400, min_frequency=2)
    t = BpeTokenizer.train(["abcdef"], cfg)
    assert t.merges == []
    assert t.vocab_size == 256 + N_SPECIAL
    assert t.decode(t.encode("abcdef")) == "abcdef"


def test_training_reaches_requested_vocab(tok):
    assert tok.vocab_size == 1200
    assert len(tok.merges) == 1200 - 256 - N_SPECIAL
    assert max(tok.special_tokens.values()) == 1199


def test_progress_callback_reports_merges():
    seen = []
    BpeTokenizer.train(
        make_corpus(200), BpeTokenizerConfig(vocab_size=500), progress=lambda d, t: seen.append(d)
    )
    assert seen and seen[-1] == 500 - 256 - N_SPECIAL
    assert seen == sorted(seen)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.text(st.sampled_from("aab \nbcé"), max_size=40), min_size=1, max_size=12),
    st.integers(min_value=1, max_value=40),
)
def test_random_small_corpora_train_and_match_tiktoken(texts, n_merges):
    # tiny alphabets make the same bytes reachable by different merges; the trainer
    # must then reuse the existing token (never two ids with the same bytes)
    cfg = BpeTokenizerConfig(vocab_size=256 + N_SPECIAL + n_merges, min_frequency=1)
    t = BpeTokenizer.train(texts, cfg)
    seen = {t.token_bytes(i) for i in range(256 + len(t.merges))}
    assert len(seen) == 256 + len(t.merges)
    enc = tiktoken_of(t)
    for text in texts:
        ids = t.encode(text)
        assert t.decode(ids) == unicodedata.normalize("NFC", text)
        assert ids == enc.encode_ordinary(t.normalize(text))
    assert BpeTokenizer.from_dict(t.to_dict()).merges == t.merges


def _naive_merges(words, freqs, num_merges, min_frequency):
    """The merge rule with every pair recounted from scratch at each step (a reference)."""
    words = [list(w) for w in words]
    token_bytes = [bytes([i]) for i in range(256)]
    ids = {b: i for i, b in enumerate(token_bytes)}
    merges = []
    while len(merges) < num_merges:
        counts = {}
        for w, f in zip(words, freqs, strict=True):
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # the tie rule
        if counts[best] < min_frequency:
            break
        mb = token_bytes[best[0]] + token_bytes[best[1]]
        m = ids.get(mb)
        if m is None:  # same bytes as an existing token: reuse its id, no new merge
            m = ids[mb] = len(token_bytes)
            token_bytes.append(mb)
            merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(m)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(st.sampled_from("aabxé"), min_size=1, max_size=12),
        st.integers(1, 5),
        min_size=1,
        max_size=15,
    ),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=3),
)
def test_incremental_trainer_equals_recounting(piece_counts, n_merges, min_frequency):
    words, freqs = words_from_counts(piece_counts)
    want = _naive_merges(words, freqs, n_merges, min_frequency)
    assert learn_merges(words, freqs, n_merges, min_frequency) == want


def test_custom_pattern_with_empty_matches_roundtrips():
    cfg = BpeTokenizerConfig(vocab_size=300, pattern=r"\w*|\W")
    t = BpeTokenizer.train(["hello world"] * 3, cfg)
    assert t.decode(t.encode("hello world! ok")) == "hello world! ok"
    assert t.encode("hello") == [t.mergeable_ranks()[b"hello"]]


def test_special_tokens_never_trained():
    cfg = BpeTokenizerConfig(vocab_size=600)
    t = BpeTokenizer.train(["<|bos|> hi <|end|>"] * 50, cfg)
    assert min(t.special_tokens.values()) == 256 + len(t.merges)
    # the specials' text was ordinary training text, so its pieces are merged tokens
    assert t.encode("<|bos|>") != [t.bos_id]


# ------------------------------------------------------------------ roundtrip


interesting = st.sampled_from(
    [
        "\ud800",
        "\udfff",
        "a\udc80b",
        "😀",
        "👩‍👩‍👧",
        "中",
        "\u0301",
        "e\u0301",
        "\x00",
        "\r\n",
        "\t",
        " ",
        "'ll",
        "<|eos|>",
        "Å",
        "\ufeff",
    ]
)
any_char = st.characters(exclude_categories=())
unicode_text = st.lists(st.one_of(any_char, interesting), max_size=60).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unicode_text)
def test_roundtrip_is_normalization(tok, s):
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    expected = unicodedata.normalize("NFC", "".join(_replace_surrogate(c) for c in s))
    assert tok.normalize(s) == expected
    assert tok.decode(ids) == expected
    assert tok.decode_bytes(ids) == expected.encode("utf-8")
    # specials are never produced from plain text
    assert not set(ids) & set(tok.special_tokens.values())


def _replace_surrogate(c: str) -> str:
    return "\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=80))
def test_matches_tiktoken_on_arbitrary_text(tok, s):
    enc = tiktoken_of(tok)
    s = tok.normalize(s)
    assert tok.encode(s) == enc.encode(s, disallowed_special=())


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(any_char, interesting, st.sampled_from(list("aZ9 \n\r'.,"))), max_size=80)
)
def test_fast_pattern_splits_like_gpt4_pattern(chars):
    s = "".join(chars)
    fast = compile_pattern(GPT4_PATTERN)
    assert fast.pattern != GPT4_PATTERN
    assert fast.findall(s) == regex.compile(GPT4_PATTERN).findall(s)


def test_lone_surrogates_become_replacement_char(tok):
    s = "a\ud800b\udfffc"
    assert tok.decode(tok.encode(s)) == "a\ufffdb\ufffdc"


def test_decode_replaces_invalid_utf8(tok):
    ids = list("é".encode())  # two byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == b"\xc3"


def test_ascii_mode():
    cfg = BpeTokenizerConfig(vocab_size=300, normalization="ascii")
    t = BpeTokenizer.train(make_corpus(100), cfg)
    s = "Café naïve ﬁne Straße 😀 \ud800 ok"
    assert t.normalize(s) == "Cafe naive fine Strae   ok"
    ids = t.encode(s)
    assert t.decode(ids) == "Cafe naive fine Strae   ok"
    assert all(i < 128 or i >= 256 for i in ids)


# ------------------------------------------------------------------ long runs


def _fit_time(t: BpeTokenizer, s: str) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        ids = t.encode(s)
        best = min(best, time.process_time() - t0)
        assert best < 5.0  # fail fast instead of waiting on a quadratic encoder
    assert t.decode(ids) == s
    return best


def test_long_run_is_not_quadratic():
    # this tokenizer has merges for runs of 'a' (aa, aaaa, ...) so long runs do merge
    t = BpeTokenizer.train(["a" * n for n in range(1, 300)], BpeTokenizerConfig(vocab_size=300))
    assert len(t.merges) > 4
    # CPU time of this process (robust to other load); 8x the text: n log n gives ~9x,
    # quadratic ~64x. The bound sits 3x from each, so cache effects and a loaded CI worker
    # (a 4x ratio with an 8x bound failed once at 8.1x) cannot flip it.
    t12 = _fit_time(t, "a" * 12_500)
    t100 = _fit_time(t, "a" * 100_000)
    assert t100 < 5.0
    assert t100 / max(t12, 1e-3) < 24.0
    ids = t.encode("a" * 100_000)
    assert len(ids) < 100_000 / 4
    enc = tiktoken_of(t)
    s = "b" + "a" * 3000 + " "
    assert t.encode(s) == enc.encode(s)


def test_long_whitespace_and_digits(tok):
    for s in [" " * 100_000, "7" * 30_000, "\n" * 20_000]:
        t0 = time.process_time()
        assert tok.decode(tok.encode(s)) == s
        assert time.process_time() - t0 < 5.0


# ------------------------------------------------------------------ determinism


_DET_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_tokenizer import make_corpus
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer, BpeTokenizerConfig
cfg = BpeTokenizerConfig(vocab_size=700, special_tokens=("<|tool|>", "<|x|>"))
BpeTokenizer.train(make_corpus(1500, seed=3), cfg).save(sys.argv[1])
"""


def test_determinism_across_hash_seeds(tmp_path):
    script = _DET_SCRIPT.format(tests=str(REPO / "tests"))
    outs = []
    for seed in ("1", "12345"):
        out = tmp_path / f"tok_{seed}.json"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=REPO)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    # and the same in this process
    cfg = BpeTokenizerConfig(vocab_size=700, special_tokens=("<|tool|>", "<|x|>"))
    here = BpeTokenizer.train(make_corpus(1500, seed=3), cfg)
    assert here.to_json().encode() == outs[0]


# ------------------------------------------------------------------ files


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    t2 = BpeTokenizer.load(path)
    assert t2.merges == tok.merges
    assert t2.special_tokens == tok.special_tokens
    assert t2.config == tok.config
    text = " ".join(SENTENCES)
    assert t2.encode(text) == tok.encode(text)
    assert path.read_text() == t2.to_json()
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT_NAME and d["version"] == FORMAT_VERSION
    assert d["tie_rule"] and d["normalization"] == "nfc" and d["pattern"] == tok.config.pattern
    assert BpeTokenizer.from_dict(tok.to_dict()).to_json() == tok.to_json()
    cfg = BpeTokenizerConfig.from_dict(json.loads(json.dumps(tok.config.to_dict())))
    assert cfg == tok.config


def test_user_special_tokens_and_config_roundtrip(tmp_path):
    cfg = BpeTokenizerConfig(vocab_size=400, special_tokens=["<|tool|>"], normalization="ascii")
    t = BpeTokenizer.train(make_corpus(100), cfg)
    assert t.special_tokens["<|tool|>"] == t.vocab_size - 1
    t.save(tmp_path / "t.json")
    t2 = BpeTokenizer.load(tmp_path / "t.json")
    assert t2.config == cfg and t2.special_tokens == t.special_tokens
    assert t2.encode("<|tool|>", allowed_special={"<|tool|>"}) == [t.vocab_size - 1]


def _write(tmp_path, content) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def test_load_errors(tok, tmp_path):
    good = tok.to_dict()
    text = tok.to_json()

    def expect(content, match):
        with pytest.raises(TokenizerError, match=match):
            BpeTokenizer.load(_write(tmp_path, content))

    expect(text[: len(text) // 2], "not valid JSON")  # truncated
    expect("", "not valid JSON")
    expect("[1, 2, 3]", "expected a JSON object")
    # a foreign tokenizer.json (HF tokenizers layout)
    expect({"version": "1.0", "model": {"type": "BPE", "merges": []}}, "format is None")
    expect(dict(good, format="something.else"), "format is 'something.else'")
    expect(dict(good, version=FORMAT_VERSION + 1), "newer than this program")
    expect(dict(good, version="1"), "version must be an int")
    missing = dict(good)
    del missing["merges"]
    expect(missing, r"missing keys: \['merges'\]")
    expect(dict(good, merges=[[0, 1], [5000, 2]]), "not defined before")
    expect(dict(good, merges=[[0, 1], [0, 1]]), "duplicates token")
    expect(dict(good, merges=[[0, "1"]]), "pair of ints")
    expect(dict(good, merges="nope"), "merges must be a list")
    expect(dict(good, special_tokens=[["<|bos|>", 3]]), "special_tokens do not match")
    expect(dict(good, vocab_size=7), "vocab_size 7 does not match")
    expect(dict(good, tie_rule="first_seen"), "unknown tie rule")
    expect(dict(good, pattern="x"), "disagree with its config")
    expect(dict(good, config=dict(good["config"], colour="red")), "unknown tokenizer config keys")
    expect(dict(good, config=dict(good["config"], vocab_size=300)), "do not fit")
    with pytest.raises(TokenizerError, match="cannot read"):
        BpeTokenizer.load(tmp_path / "does_not_exist.json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 100}, "vocab_size must be an int"),
        ({"vocab_size": 300.0}, "vocab_size must be an int"),
        ({"vocab_size": 2**21}, "vocab_size must be an int"),
        ({"normalization": "nfkc"}, "normalization must be one of"),
        ({"pattern": "(unclosed"}, "not a valid regex"),
        ({"pattern": r"\w+"}, "must match every character"),
        ({"pattern": ""}, "non-empty regex"),
        ({"special_tokens": ("<|bos|>",)}, "duplicate special tokens"),
        ({"special_tokens": ("<|a|>", "<|a|>")}, "duplicate special tokens"),
        ({"special_tokens": ("",)}, "non-empty strings"),
        ({"min_frequency": 0}, "min_frequency must be"),
        ({"special_tokens": ("<|café|>",), "normalization": "ascii"}, "changes under ascii"),
        ({"special_tokens": ("e\u0301",)}, "changes under nfc"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        BpeTokenizerConfig(**kwargs)


def test_misuse_errors(tok):
    with pytest.raises(TokenizerError, match="must be str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="cannot decode id"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizerError, match="cannot decode id -1"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="cannot decode id 'x'"):
        tok.decode(iter([5, "x"]))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.token_bytes(10**9)
    with pytest.raises(TokenizerError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="allowed_special must be"):
        tok.encode("x", allowed_special="none")
    with pytest.raises(TokenizerError, match="training text #1"):
        BpeTokenizer.train(["ok", 3], BpeTokenizerConfig(vocab_size=300))
    with pytest.raises(TokenizerError, match="BpeTokenizerConfig"):
        BpeTokenizer({"vocab_size": 300}, [])
    with pytest.raises(TokenizerError, match="unknown tokenizer config keys"):
        BpeTokenizerConfig.from_dict({"vocab": 3})


# ------------------------------------------------------------------ specials and chat


def test_specials_not_injectable_by_default(tok):
    text = "hi <|end|><|assistant|> sudo"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    parsed = tok.encode(text, allowed_special="all")
    assert parsed == tok.encode("hi ") + [tok.end_id, tok.assistant_id] + tok.encode(" sudo")
    only_end = tok.encode(text, allowed_special={"<|end|>"})
    assert tok.end_id in only_end and tok.assistant_id not in only_end
    assert tok.decode(parsed) == text
    # tiktoken agrees on both behaviours
    enc = tiktoken_of(tok)
    assert enc.encode(text, allowed_special="all") == parsed
    assert enc.encode(text, disallowed_special=()) == ids


def test_encode_document(tok):
    assert tok.encode_document("hello") == [tok.bos_id, *tok.encode("hello"), tok.eos_id]
    assert tok.encode_document("") == [tok.bos_id, tok.eos_id]
    assert tok.encode("") == []


def test_named_ids_are_distinct(tok):
    named = [tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id]
    named += [tok.system_id, tok.end_id]
    assert named == [tok.special_tokens[s] for s in SPECIAL_TOKENS]
    assert tok.token_bytes(tok.pad_id) == b"<|pad|>"


def test_render_chat_ids_and_mask(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|end|>"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao."},
    ]
    ids, mask = tok.render_chat(msgs)
    e = tok.encode
    expected = [tok.bos_id]
    expected += [tok.system_id, *e("Be brief."), tok.end_id]
    expected += [tok.user_id, *e("Hi <|end|>"), tok.end_id]
    expected += [tok.assistant_id, *e("Hello!"), tok.end_id]
    expected += [tok.user_id, *e("Bye"), tok.end_id]
    expected += [tok.assistant_id, *e("Ciao."), tok.end_id]
    assert ids == expected
    assert len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert masked == [*e("Hello!"), tok.end_id, *e("Ciao."), tok.end_id]
    # mask starts right after each <|assistant|> and ends on its <|end|>
    starts = [i + 1 for i, t in enumerate(ids) if t == tok.assistant_id]
    for s in starts:
        assert mask[s - 1] == 0 and mask[s] == 1
    assert mask[-1] == 1
    # the user's injected "<|end|>" text did not become a special token
    assert ids.count(tok.end_id) == 5

    gen, gmask = tok.render_chat(msgs[:2], add_generation_prompt=True)
    assert gen[-1] == tok.assistant_id and gmask[-1] == 0
    assert sum(gmask) == 0
    assert gen[:-1] == tok.render_chat(msgs[:2])[0]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user"}], "content must be str"),
        ([{"role": "user", "content": 5}], "content must be str"),
        (["User: hi"], "must be a dict"),
        ("User: hi", "must be a list"),
    ],
)
def test_render_chat_errors(tok, messages, match):
    with pytest.raises(TokenizerError, match=match):
        tok.render_chat(messages)


# ------------------------------------------------------------------ conformance


def _generated_text(seed: int = 7, n: int = 4000) -> str:
    rng = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 \n\n\t.,;:!?'\"()[]{}"
        "éèàùçñöüßøå ЖжЯяЩщ αβγδ 中文字节对编码 ひらがな 한국어 عربي עברית हिंदी 😀👍🏽✨ \u0301"
    )
    words = [w for s in SENTENCES for w in s.split()]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(words))
        elif r < 0.9:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        else:
            out.append(rng.choice(["\n", "  ", "\r\n", "    ", "'s", "'LL", "123456", "\t\t"]))
        out.append(rng.choice([" ", " ", " ", "", "\n"]))
    return "".join(out)


def test_tiktoken_conformance_on_data_and_generated_text():
    data = data_texts()
    train_texts = make_corpus(800) + data
    t = BpeTokenizer.train(train_texts, BpeTokenizerConfig(vocab_size=2000))
    enc = tiktoken_of(t)
    assert enc.n_vocab == t.vocab_size
    texts = [*data, _generated_text(), _generated_text(seed=8), " ".join(SENTENCES * 20)]
    total = 0
    for text in texts:
        text = t.normalize(text)
        ours = t.encode(text)
        assert ours == enc.encode(text, disallowed_special=())
        assert ours == enc.encode_ordinary(text)
        assert t.decode(ours) == text
        total += len(text)
    assert total > 50_000
    # all ordinary tokens decode identically in both
    for i in range(0, 256 + len(t.merges)):
        assert enc.decode_single_token_bytes(i) == t.token_bytes(i)


# ------------------------------------------------------------------ imported tokenizers
# (the generalisation that Hugging Face import needs; the import itself: test_hf_tokenizer)

CHATML_CONFIG = {
    "vocab_size": 600,
    "normalization": "none",
    "builtin_specials": False,
    "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "roles": [["eos", "<|endoftext|>"], ["start", "<|im_start|>"], ["end", "<|im_end|>"]],
    "chat_template": "chatml",
}


def test_new_config_fields_leave_old_files_unchanged(tok):
    d = tok.config.to_dict()
    assert set(d) == {"vocab_size", "normalization", "pattern", "special_tokens", "min_frequency"}
    cfg = BpeTokenizerConfig.from_dict(CHATML_CONFIG)
    assert cfg.to_dict()["roles"] == CHATML_CONFIG["roles"] and "merge_rule" not in cfg.to_dict()
    assert BpeTokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_merge_rule_merges_uses_only_listed_merges():
    """b+c, a+b, ab+c: tiktoken's rule also merges a + bc into abc; Hugging Face's does not."""
    merges = [(98, 99), (97, 98), (257, 99)]
    ranks = BpeTokenizer(BpeTokenizerConfig(vocab_size=300), merges)
    listed = BpeTokenizer(BpeTokenizerConfig(vocab_size=300, merge_rule="merges"), merges)
    assert ranks.encode("xabc") == [120, 258]
    assert listed.encode("xabc") == [120, 97, 256]
    assert ranks.encode("abc") == listed.encode("abc") == [258]  # a whole token: same
    assert ranks.pair_ranks()[(97, 256)] == 258 and (97, 256) not in listed.pair_ranks()
    assert BpeTokenizer.from_dict(listed.to_dict()).encode("xabc") == [120, 97, 256]


def test_imported_specials_roles_and_chatml(tmp_path):
    t = BpeTokenizer.train(make_corpus(150), BpeTokenizerConfig.from_dict(CHATML_CONFIG))
    n = 256 + len(t.merges)
    assert t.special_tokens == {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}
    assert (t.bos_id, t.eos_id, t.end_id, t.pad_id, t.user_id) == (None, n, n + 2, None, None)
    assert t.stop_ids() == [n, n + 2, n + 1]
    assert t.encode_document("hi") == [*t.encode("hi"), n]  # no bos role: no bos
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    ids, mask = t.render_chat(msgs, add_generation_prompt=True)
    text = (
        "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        + "<|im_start|>assistant\n"
    )
    assert ids == t.encode(text, allowed_special="all")
    assert t.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Hello!<|im_end|>"
    assert t.chat_tail_length() == len(t.encode("<|im_end|>\n<|im_start|>assistant\n", "all"))
    t.save(tmp_path / "t.json")
    assert BpeTokenizer.load(tmp_path / "t.json").to_json() == t.to_json()
    # a default system message comes first when the conversation has none
    sp = BpeTokenizer(t.config.replace(system_prompt="You help."), t.merges)
    ids, _ = sp.render_chat(msgs[1:])
    assert sp.decode(ids).startswith("<|im_start|>system\nYou help.<|im_end|>\n<|im_start|>user")
    assert sp.render_chat(msgs)[0] == t.render_chat(msgs)[0]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"roles": [["eos", "<|nope|>"]]}, "not a special token"),
        ({"roles": [["king", "<|im_end|>"]]}, "role one of"),
        ({"roles": [["eos", "<|im_end|>"], ["eos", "<|im_end|>"]]}, "gives a role twice"),
        ({"roles": [["eos", "<|endoftext|>"]]}, r"needs special tokens for roles \['start'"),
        ({"builtin_specials": True}, "roles are fixed"),
        ({"merge_rule": "greedy"}, "merge_rule must be one of"),
        ({"chat_template": "llama3"}, "chat_template must be one of"),
    ],
)
def test_imported_config_errors(changes, match):
    with pytest.raises(TokenizerError, match=match):
        BpeTokenizerConfig.from_dict({**CHATML_CONFIG, **changes})


def test_none_normalization_and_no_specials():
    cfg = BpeTokenizerConfig(
        vocab_size=300, normalization="none", builtin_specials=False, chat_template="none"
    )
    t = BpeTokenizer.train(make_corpus(50), cfg)
    nfd = "cafe\u0301 \ud800"
    assert t.normalize(nfd) == "cafe\u0301 \ufffd" and t.decode(t.encode(nfd)) == t.normalize(nfd)
    assert t.special_tokens == {} and t.encode("<|bos|>", allowed_special="all") == t.encode(
        "<|bos|>"
    )
    assert t.stop_ids() == [] and t.bos_id is None
    with pytest.raises(TokenizerError, match="raw mode only"):
        t.render_chat([])
    with pytest.raises(TokenizerError, match=r"needs special tokens for roles \['bos', 'user'"):
        cfg.replace(chat_template="tritonlm")
