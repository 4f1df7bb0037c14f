"""Our tokenizer in Hugging Face's formats: ``tokenizer.json`` (the ``tokenizers`` library's
own file), ``tokenizer_config.json`` (with a Jinja chat template) and back.

Export writes what ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer``
read to give exactly our ids: a byte-level BPE model whose vocabulary strings use the GPT-2
byte alphabet (:mod:`.byte_level`), ``ignore_merges`` (a pre-token that is a whole token
becomes that token, our rule), our pre-tokenizer regex as a ``Split`` before a regex-free
``ByteLevel``, and our special tokens as added tokens (matched before normalization, never
inside plain text). Neither library is needed at run time: this module only builds and
reads JSON.

Import (:func:`import_hf_tokenizer`) reads a byte-level BPE ``tokenizer.json`` (GPT-2,
SmolLM, Qwen, Llama-3 style) into our layout: bytes, merges by rank, special tokens, with
``hf_ids`` to permute embedding rows. Anything we cannot reproduce exactly is refused with
one line naming the field (:class:`HFFormatError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tokenizer.bpe_tokenizer import BpeTokenizer
from ..tokenizer.chat_template import jinja_template
from .byte_level import token_to_str
from .hf_format import TRAINING_KEY, HFFormatError, ImportedTokenizer
from .hf_tokenizer_import import read_hf_tokenizer

__all__ = [
    "eos_token_ids",
    "hf_tokenizer_files",
    "import_hf_tokenizer",
]


def import_hf_tokenizer(folder: str | Path) -> ImportedTokenizer:
    """Read ``folder``'s ``tokenizer.json`` (and ``tokenizer_config.json``, if any) into our
    tokenizer; raises :class:`HFFormatError` naming the field it cannot represent."""
    return read_hf_tokenizer(Path(folder))


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _normalizer(tok: BpeTokenizer) -> dict[str, Any] | None:
    """Our normalization as a ``tokenizers`` normalizer (surrogates cannot reach it: Rust
    strings are valid Unicode)."""
    kind = tok.config.normalization
    if kind == "nfc":
        return {"type": "NFC"}
    if kind == "ascii":  # NFKD, then drop every non-ASCII code point
        drop = {"type": "Replace", "pattern": {"Regex": "[^\\x00-\\x7F]"}, "content": ""}
        return {"type": "Sequence", "normalizers": [{"type": "NFKD"}, drop]}
    if kind == "none":
        return None
    raise HFFormatError(f"normalization {kind!r} has no Hugging Face equivalent")


def hf_merges(tok: BpeTokenizer) -> list[list[str]]:
    """The merges list that makes HF's pair-rank BPE equal our encoder.

    With ``merge_rule="merges"`` ours is HF's rule, so the list is our merges. With the
    tiktoken rule (``"ranks"``) a token may also form from a split other than its merge
    (``"abc"`` from ``a + bc`` as well as ``ab + c``): every such split is listed, at the
    rank of its token, our own merge first, so HF merges what tiktoken would merge.
    """
    strs = [token_to_str(tok.token_bytes(i)) for i in range(256 + len(tok.merges))]
    if tok.merge_rule == "merges":
        return [[strs[a], strs[b]] for a, b in tok.merges]
    by_token: dict[int, list[tuple[int, int]]] = {}
    for pair, t in tok.pair_ranks().items():
        by_token.setdefault(t, []).append(pair)
    out: list[list[str]] = []
    for r, own in enumerate(tok.merges):
        others = sorted(p for p in by_token.get(256 + r, ()) if p != own)
        out += [[strs[a], strs[b]] for a, b in (own, *others)]
    return out


def tokenizer_json(tok: BpeTokenizer) -> dict[str, Any]:
    """The ``tokenizer.json`` object of ``tokenizers`` for ``tok``."""
    n_plain = 256 + len(tok.merges)
    vocab = {token_to_str(tok.token_bytes(i)): i for i in range(n_plain)}
    added = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    split = {
        "type": "Split",
        "pattern": {"Regex": tok.config.pattern},
        "behavior": "Isolated",
        "invert": False,
    }
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _normalizer(tok),
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [split, {**byte_level, "use_regex": False}],
        },
        "post_processor": None,
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": hf_merges(tok),
        },
    }


def tokenizer_config_json(tok: BpeTokenizer, model_max_length: int | None = None) -> dict:
    """``tokenizer_config.json``: the class, the role tokens and the chat template."""
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("bos", "eos", "pad"):
        text = tok.role_token(role)
        if text is not None:
            cfg[f"{role}_token"] = text
    cfg["unk_token"] = None
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg["clean_up_tokenization_spaces"] = False
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    # the training knobs of our config, which the vocabulary alone does not tell: an import
    # of this folder then gives back our tokenizer.json byte for byte
    cfg[TRAINING_KEY] = {
        "vocab_size": tok.config.vocab_size,
        "min_frequency": tok.config.min_frequency,
    }
    template = jinja_template(tok)
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def hf_tokenizer_files(
    tok: BpeTokenizer, model_max_length: int | None = None
) -> dict[str, dict[str, Any]]:
    """File name -> JSON object for the tokenizer half of a Hugging Face model folder:
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    special_map = {
        f"{role}_token": text
        for role in ("bos", "eos", "pad")
        if (text := tok.role_token(role)) is not None
    }
    return {
        "tokenizer.json": tokenizer_json(tok),
        "tokenizer_config.json": tokenizer_config_json(tok, model_max_length),
        "special_tokens_map.json": special_map,
    }


def eos_token_ids(tok: BpeTokenizer) -> list[int]:
    """Every id that ends an answer (``generation_config.json``'s ``eos_token_id``): the
    stop tokens of our generator, end of document first, then end of turn, then the rest."""
    return tok.stop_ids()
