"""Our tokenizer in Hugging Face's formats, proven by their real readers.

Export: ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer`` on the files
of ``hf_tokenizer_files`` give our ids, chat prompts and decodes. Import: tokenizers trained
here with the ``tokenizers`` library come into our layout and encode to the same tokens;
export then import is the identity; what we cannot represent is refused in one line.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer
from tritonlm.engine.inference.chat_prompt import encode_raw_prompt
from tritonlm.engine.inference.decode_row import default_stop_ids
from tritonlm.engine.interop.hf_format import HFFormatError
from tritonlm.engine.interop.hf_tokenizer import (
    eos_token_ids,
    hf_tokenizer_files,
    import_hf_tokenizer,
)
from tritonlm.engine.interop.hf_tokenizer_import import GPT2_DIGITS_PATTERN, GPT2_PATTERN
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig, TokenizerError

REPO = Path(__file__).resolve().parents[1]
DOCS = json.loads((REPO / "data" / "pretrain.json").read_text(encoding="utf-8"))
CHATS = json.loads((REPO / "data" / "chat.json").read_text(encoding="utf-8"))
TRAIN = DOCS[::2] + CHATS[::2]
HELD_OUT = DOCS[1::2][:150] + CHATS[1::2][:100]  # never seen in training

PARAGRAPH = (
    "On a grey Tuesday in 2031, Ada's robot -- model RX-9000 -- misread 1234567890 as a "
    "phone number, then apologised: \"I'm sorry, I didn't mean to!\"  It re-read the "
    "sheet twice,\tchecked the totals (3.14159 x 2 = 6.28318), and wrote them down.\n\n"
    "    Indented code: def f(x): return x**2  # squares\r\nThe end..."
)
EDGE_CASES = [
    "e\u0301 a\u0308 o\u0302 n\u0303",  # combining marks (NFD)
    "caf\u00e9 vs cafe\u0301",  # NFC and NFD in one string
    "Emoji: 😀😃 👍🏽 👩‍👩‍👧 🇫🇷 ❤️ ✨",
    "中文分词很有意思。日本語のテキスト。한국어 문장.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "line one\r\nline two\r\n\r\nthree\n",
    "tabs\tand\t\ttabs \t mixed",
    "digits 12345678901234567890 and 0.000001 and 1,000,000",
    "contractions: I'm you're they've she'll we'd it's DON'T Can'T",
    "   leading spaces and trailing   ",
    " x",
    "\n\n\n",
    "ﬁ ligature, ſ long s, 'ſ, Ⅻ roman, ① circled, ½ half",
    "\u00a0nbsp\u3000ideographic\u2003em\u200bzwsp",
    "controls \x00\x01\x1b[0m\x7f\x1c\x1d\x85 end",
    "look-alikes: <|end> <|bos |> |> <| < |eos|>",
    "a" * 300 + " " + "9" * 40,
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a token?"},
    {"role": "assistant", "content": "A piece of text, like ' the'."},
    {"role": "user", "content": " Thanks!\nAnd  café?"},
]


def write_files(folder: Path, files: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return folder


def chat_ids(hf, messages, add_generation_prompt=True) -> list[int]:
    out = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"] if not isinstance(out, list) else out)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours() -> BpeTokenizer:
    cfg = BpeTokenizerConfig(vocab_size=1500, special_tokens=("<|tool|>",))
    return BpeTokenizer.train(TRAIN, cfg)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory) -> Path:
    files = hf_tokenizer_files(ours, model_max_length=256)
    return write_files(tmp_path_factory.mktemp("export"), files)


@pytest.fixture(scope="module")
def hf_fast(exported) -> Tokenizer:
    return Tokenizer.from_file(str(exported / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_auto(exported):
    return AutoTokenizer.from_pretrained(str(exported))


def test_export_gives_our_ids_on_held_out_text(ours, hf_fast, hf_auto):
    for text in [*HELD_OUT, PARAGRAPH]:
        want = ours.encode(text)
        assert hf_fast.encode(text, add_special_tokens=False).ids == want, text
        assert hf_auto(text)["input_ids"] == want, text  # no bos added: like encode


@pytest.mark.parametrize("text", EDGE_CASES)
def test_export_gives_our_ids_on_unicode_edge_cases(ours, hf_fast, hf_auto, text):
    want = ours.encode(text)
    assert hf_fast.encode(text, add_special_tokens=False).ids == want
    assert hf_auto.encode(text, add_special_tokens=False) == want
    nfd = unicodedata.normalize("NFD", text)  # both normalize to NFC first
    assert hf_fast.encode(nfd, add_special_tokens=False).ids == ours.encode(nfd) == want


def test_export_special_token_text(ours, hf_auto):
    text = "say <|end|> and <|bos|><|tool|> but not <|nope|>"
    # Hugging Face parses special-token text by default, as our allowed_special="all" does;
    # split_special_tokens=True is our default (plain text, no injected control tokens)
    assert hf_auto(text)["input_ids"] == ours.encode(text, allowed_special="all")
    assert hf_auto(text, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert ours.encode(text) != ours.encode(text, allowed_special="all")


def test_export_keeps_the_tiktoken_rule(ours, exported, tmp_path):
    """Our rule merges a pair by the rank of the token it makes, whatever split: with
    b+c, a+b, ab+c learned, "xabc" is [x, abc] (via a + bc), where Hugging Face's rule
    with only those merges stops at [x, a, bc]. The file lists every split."""
    data = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["ignore_merges"] is True and data["model"]["byte_fallback"] is False
    assert len(data["model"]["merges"]) == len(ours.pair_ranks()) > len(ours.merges)
    tok = BpeTokenizer(BpeTokenizerConfig(vocab_size=300), [(98, 99), (97, 98), (257, 99)])
    assert tok.encode("xabc") == [120, 258]
    files = hf_tokenizer_files(tok)
    hf = Tokenizer.from_file(str(write_files(tmp_path / "a", files) / "tokenizer.json"))
    assert hf.encode("xabc zbc cab abcabc", add_special_tokens=False).ids == tok.encode(
        "xabc zbc cab abcabc"
    )
    back = import_hf_tokenizer(tmp_path / "a")
    assert back.tokenizer.merge_rule == "ranks" and back.tokenizer.to_json() == tok.to_json()
    # the same merges under Hugging Face's rule: exported and imported as such
    hf_rule = BpeTokenizer(tok.config.replace(merge_rule="merges"), tok.merges)
    assert hf_rule.encode("xabc") == [120, 97, 256]
    hf = Tokenizer.from_file(
        str(write_files(tmp_path / "b", hf_tokenizer_files(hf_rule)) / "tokenizer.json")
    )
    assert hf.encode("xabc", add_special_tokens=False).ids == [120, 97, 256]
    assert import_hf_tokenizer(tmp_path / "b").tokenizer.to_json() == hf_rule.to_json()


def test_export_chat_template_gives_our_prompt_ids(ours, hf_auto):
    cases = [MESSAGES, MESSAGES[1:], MESSAGES[1:2], MESSAGES + MESSAGES[2:]]
    for messages in cases:
        for gen in (True, False):
            want, _ = ours.render_chat(messages, add_generation_prompt=gen)
            assert chat_ids(hf_auto, messages, gen) == want
    with pytest.raises(Exception, match="role must be"):
        chat_ids(hf_auto, [{"role": "tool", "content": "x"}])


def test_export_decode_round_trip(ours, hf_fast, hf_auto):
    for text in [PARAGRAPH, *EDGE_CASES[:6]]:
        ids = ours.encode(text)
        assert hf_auto.decode(ids) == ours.decode(ids) == ours.normalize(text)
        assert hf_fast.decode(ids, skip_special_tokens=False) == ours.decode(ids)
    ids, _ = ours.render_chat(MESSAGES, add_generation_prompt=True)
    assert hf_auto.decode(ids) == ours.decode(ids)
    cut = ours.encode("é😀")[:-1]  # a cut multi-byte character: U+FFFD on both sides
    assert hf_auto.decode(cut) == ours.decode(cut)


def test_export_config_and_eos_ids(ours, exported, hf_auto):
    assert hf_auto.bos_token_id == ours.bos_id and hf_auto.pad_token_id == ours.pad_id
    assert hf_auto.eos_token_id == ours.eos_id and hf_auto.model_max_length == 256
    eos = eos_token_ids(ours)
    assert eos[:2] == [ours.eos_id, ours.end_id]
    assert sorted(eos) == sorted(default_stop_ids(ours, None))  # what our generator stops on
    special_map = json.loads((exported / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|eos|>"


def test_export_ascii_normalization(tmp_path):
    tok = BpeTokenizer.train(TRAIN[:200], BpeTokenizerConfig(vocab_size=600, normalization="ascii"))
    hf = Tokenizer.from_file(str(write_files(tmp_path, hf_tokenizer_files(tok)) / "tokenizer.json"))
    for text in ["Café ﬁ naïve", *EDGE_CASES, PARAGRAPH]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------

HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_DEFAULT_SYSTEM = (  # SmolLM2-Instruct's shape: a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
    "'<|im_end|>\n\n' + message['content'] | trim + '<|endoftext|>' }}{% endfor %}"
)


def train_hf(
    folder: Path, pre_tokenizer, template: str | None = CHATML, all_bytes=True, post=None
) -> Path:
    """A byte-level BPE trained here with the tokenizers library, saved like a model's
    (``all_bytes=False``: like SmolLM, only the bytes seen in training get a token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    if post is not None:
        tok.post_processor = post
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=HF_SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TRAIN, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("gpt2"), pre_tokenizers.ByteLevel(False))


def assert_same_ids(imported, hf: Tokenizer, texts):
    tok, hf_ids = imported.tokenizer, imported.hf_ids
    for text in texts:
        mine = [hf_ids[i] for i in tok.encode(text)]
        assert mine == hf.encode(text, add_special_tokens=False).ids, text


def test_import_trained_byte_level_bpe(gpt2_style):
    imported = import_hf_tokenizer(gpt2_style)
    tok, hf_ids = imported.tokenizer, imported.hf_ids
    hf = Tokenizer.from_file(str(gpt2_style / "tokenizer.json"))
    assert sorted(hf_ids) == list(range(hf.get_vocab_size()))  # a permutation of HF's ids
    assert tok.config.pattern == GPT2_PATTERN and tok.merge_rule == "merges"
    assert tok.config.normalization == "none" and tok.config.chat_template == "chatml"
    assert tok.eos_id == hf_ids.index(hf.token_to_id("<|endoftext|>")) and tok.bos_id is None
    assert imported.notes == []
    assert_same_ids(imported, hf, [*HELD_OUT, PARAGRAPH, *EDGE_CASES])
    ids = tok.encode(PARAGRAPH)
    assert hf.decode([hf_ids[i] for i in ids]) == tok.decode(ids) == PARAGRAPH
    # the ChatML template came along: our prompt ids are the template's
    auto = AutoTokenizer.from_pretrained(str(gpt2_style))
    for messages in (MESSAGES, MESSAGES[1:]):
        ids, mask = tok.render_chat(messages, add_generation_prompt=True)
        assert [hf_ids[i] for i in ids] == chat_ids(auto, messages)
        answer = [t for t, m in zip(ids, mask, strict=True) if m]
        assert tok.decode(answer) == MESSAGES[2]["content"] + "<|im_end|>"
    end = hf_ids.index(hf.token_to_id("<|im_end|>"))
    assert tok.stop_ids()[:2] == [tok.eos_id, end]


def test_import_digits_pre_tokenizer(tmp_path):
    """SmolLM's pre-tokenizer: every digit alone, then GPT-2's byte-level regex."""
    seq = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    folder = train_hf(tmp_path, seq)
    imported = import_hf_tokenizer(folder)
    assert imported.tokenizer.config.pattern == GPT2_DIGITS_PATTERN
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    digits = ["a 1", "x  12 3", "  4\n5 ", "tab\t7\t", "٣ Ⅻ ½ ①", "1.5e-3 +44 (0)20"]
    assert_same_ids(imported, hf, [*HELD_OUT[:80], PARAGRAPH, *EDGE_CASES, *digits])


def test_import_bos_from_post_processor_and_missing_bytes(tmp_path):
    """A post-processor that puts a bos before each text makes that token our bos (raw
    prompts start with it, as HF's do); bytes without a token map to hf_ids -1."""
    post = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", 0)
    ])  # fmt: skip
    folder = train_hf(tmp_path, pre_tokenizers.ByteLevel(False), all_bytes=False, post=post)
    imported = import_hf_tokenizer(folder)
    tok, hf_ids = imported.tokenizer, imported.hf_ids
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.bos_id == hf_ids.index(0)
    absent = [b for b in range(256) if hf_ids[b] == -1]
    assert absent and "\x04" not in "".join(TRAIN) and 4 in absent
    assert f"{len(absent)} bytes have no token" in imported.notes[0]
    assert sorted(i for i in hf_ids if i != -1) == list(range(hf.get_vocab_size()))
    texts = [t for t in HELD_OUT if not set(t.encode()) & set(absent)]  # HF drops those
    assert len(texts) > 200
    assert_same_ids(imported, hf, texts)
    for text in texts[:50]:
        ids = [hf_ids[i] for i in encode_raw_prompt(tok, text)]
        assert ids == hf.encode(text).ids  # with the post-processor's bos


def test_import_chat_templates(tmp_path):
    folder = train_hf(tmp_path / "a", pre_tokenizers.ByteLevel(False), CHATML_DEFAULT_SYSTEM)
    imported = import_hf_tokenizer(folder)
    tok = imported.tokenizer
    assert tok.config.system_prompt == "You are a helpful AI assistant."
    auto = AutoTokenizer.from_pretrained(str(folder))
    for messages in (MESSAGES, MESSAGES[1:], MESSAGES[1:2]):
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        assert [imported.hf_ids[i] for i in ids] == chat_ids(auto, messages)
    # a template we cannot render: named in a note; raw mode keeps working
    folder = train_hf(tmp_path / "b", pre_tokenizers.ByteLevel(False), LLAMA3_LIKE)
    imported = import_hf_tokenizer(folder)
    assert imported.tokenizer.config.chat_template == "none"
    assert len(imported.notes) == 1 and "{{ bos_token }}" in imported.notes[0]
    with pytest.raises(TokenizerError, match="raw mode only"):
        imported.tokenizer.render_chat(MESSAGES)
    assert imported.tokenizer.decode(imported.tokenizer.encode(PARAGRAPH)) == PARAGRAPH
    folder = train_hf(tmp_path / "c", pre_tokenizers.ByteLevel(False), None)
    assert import_hf_tokenizer(folder).notes == ["no chat template: raw mode only"]


def test_export_then_import_is_the_identity(ours, exported, gpt2_style, tmp_path):
    back = import_hf_tokenizer(exported)
    assert back.tokenizer.to_json() == ours.to_json()
    assert back.hf_ids == list(range(ours.vocab_size)) and back.notes == []
    # an imported tokenizer survives our own file and a second export/import unchanged
    first = import_hf_tokenizer(gpt2_style).tokenizer
    first.save(tmp_path / "tokenizer.json")
    assert BpeTokenizer.load(tmp_path / "tokenizer.json").to_json() == first.to_json()
    again = import_hf_tokenizer(write_files(tmp_path / "x", hf_tokenizer_files(first)))
    assert again.tokenizer.to_json() == first.to_json()
    assert again.hf_ids == list(range(first.vocab_size))


def test_import_notes_tokens_merges_cannot_reach(tmp_path):
    """b+c merges before a+b: 'abc' (made by ab+c) is never reached from a, bc."""
    from tritonlm.engine.interop.byte_level import BYTE_CHARS

    vocab = {ch: i for i, ch in enumerate(BYTE_CHARS)}
    vocab.update(bc=256, ab=257, abc=258)
    data = hf_tokenizer_files(BpeTokenizer.train(["x"], BpeTokenizerConfig(vocab_size=300)))
    model = data["tokenizer.json"]["model"]
    model.update(vocab=vocab, merges=[["b", "c"], ["a", "b"], ["ab", "c"]], ignore_merges=False)
    data["tokenizer.json"]["added_tokens"] = []
    data["tokenizer_config.json"] = {}
    imported = import_hf_tokenizer(write_files(tmp_path, data))
    assert imported.tokenizer.merge_rule == "merges"
    assert any("'abc'" in n for n in imported.notes)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert_same_ids(imported, hf, ["xabcd", "ab cab bca"])  # pre-tokens that are not 'abc'


def _broken(exported: Path, tmp_path: Path, change) -> Path:
    data = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))
    change(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


METASPACE = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
REFUSALS = {
    "pre_tokenizer Metaspace": lambda d: d.update(pre_tokenizer=METASPACE),
    "model.byte_fallback": lambda d: d["model"].update(byte_fallback=True),
    "model.type 'Unigram'": lambda d: d["model"].update(type="Unigram"),
    "normalizer Lowercase": lambda d: d.update(normalizer={"type": "Lowercase"}),
    "normalizer Sequence['NFC', 'Lowercase']": lambda d: d.update(
        normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    ),
    "add_prefix_space": lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(
        add_prefix_space=True
    ),
    "decoder Metaspace": lambda d: d.update(decoder={"type": "Metaspace"}),
    "added_tokens[6] '<|end|>' is not special": lambda d: d["added_tokens"][6].update(
        special=False
    ),
    "from earlier tokens": lambda d: d["model"]["merges"].insert(
        0,
        d["model"]["merges"].pop(
            next(i for i, m in enumerate(d["model"]["merges"]) if len("".join(m)) > 4)
        ),
    ),
    "is made by no merge": lambda d: d["model"]["vocab"].update(zzzz=99999),
    "post_processor": lambda d: d.update(post_processor={"type": "BertProcessing"}),
}


@pytest.mark.parametrize("field", list(REFUSALS))
def test_import_refuses_in_one_line(exported, tmp_path, field):
    folder = _broken(exported, tmp_path, REFUSALS[field])
    with pytest.raises(HFFormatError) as info:
        import_hf_tokenizer(folder)
    msg = str(info.value)
    assert field in msg and "\n" not in msg and msg.startswith("tokenizer.json: ")
