"""What a tokenizer is made of: its config, normalization, pre-tokenizer pattern, specials.

Normalization (``BpeTokenizerConfig.normalization``):

* ``"nfc"`` (default): lone surrogates (U+D800..U+DFFF, which cannot be UTF-8 encoded)
  are replaced by U+FFFD, then Unicode NFC is applied.
* ``"ascii"``: ASCII folding: NFKD, then every non-ASCII code point (lone surrogates
  included) is dropped. ``"Café ﬁ"`` becomes ``"Cafe fi"``.

The names here are also importable from :mod:`.tokenizer`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any

import regex

from .bpe_trainer import MAX_VOCAB
from .fields import ConfigMixin, at_least, one_of, option

#: The pre-tokenizer of GPT-4 (cl100k_base): contractions, letter runs with an optional
#: leading non-letter, numbers of 1-3 digits, punctuation runs, newlines, other spaces.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The same splits as GPT4_PATTERN (tested), written with possessive quantifiers where
# backtracking can never change the match; the `regex` engine runs it ~20% faster.
_GPT4_PATTERN_FAST = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _compile_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(_GPT4_PATTERN_FAST if pattern == GPT4_PATTERN else pattern)


#: Built-in special tokens, in id order (they follow the last merge).
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
)

_NORMALIZATIONS = ("nfc", "ascii")
_SURROGATES = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """Bad tokenizer config, input, or tokenizer file. The message names the problem."""


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------


def _normalize_nfc(text: str) -> str:
    if text.isascii():
        return text
    if _SURROGATES.search(text) is not None:
        text = _SURROGATES.sub("\ufffd", text)
    if unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def _normalize_ascii(text: str) -> str:
    if text.isascii():
        return text
    text = _SURROGATES.sub("", text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


_NORMALIZERS = {"nfc": _normalize_nfc, "ascii": _normalize_ascii}


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

# Text that every usable pattern must split without skipping a character.
_PATTERN_PROBE = "Hello, wörld! 123 4567\n\n  \t x'll 中文 😀 e\u0301 \x00 ...\r\n"


def _pretokenizer_pattern(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty regex string")
    try:
        pat = regex.compile(v)
    except regex.error as e:
        raise ValueError(f"{name} is not a valid regex: {e}") from None
    if "".join(pat.findall(_PATTERN_PROBE)) != _PATTERN_PROBE:
        raise ValueError(
            f"{name} must match every character of the text (it must not skip any, "
            "and must not use capture groups)"
        )


def _token_texts(name: str, v: Any) -> None:
    if not isinstance(v, tuple) or not all(isinstance(s, str) and s for s in v):
        raise ValueError(f"{name} must be a list of non-empty strings")


@dataclass(frozen=True)
class BpeTokenizerConfig(ConfigMixin):
    """How to train a tokenizer. JSON-serializable via ``to_dict``/``from_dict``.

    vocab_size: total vocabulary size (256 bytes + merges + special tokens). Training stops
        early (smaller vocabulary) if no pair reaches ``min_frequency``.
    normalization: ``"nfc"`` or ``"ascii"`` (see the module docstring).
    pattern: pre-tokenizer regex (``regex`` package syntax); must match every character.
    special_tokens: extra user-defined special tokens, after the built-in ones.
    min_frequency: a pair must occur at least this often (weighted) to be merged.
    """

    error = TokenizerError
    what = "tokenizer config"

    # vocab_size's range depends on special_tokens: checked in check_together
    vocab_size: int = option(4096, None, "256 bytes + merges + special tokens", flag=False)
    normalization: str = option(
        "nfc", one_of(_NORMALIZATIONS), "text normalization", flag=False, choices=_NORMALIZATIONS
    )
    pattern: str = option(GPT4_PATTERN, _pretokenizer_pattern, "pre-tokenizer regex", flag=False)
    special_tokens: tuple[str, ...] = option(
        (), _token_texts, "user-defined special tokens, after the built-in ones", flag=False
    )
    min_frequency: int = option(2, at_least(1), "least (weighted) count of a merge", flag=False)

    def check_together(self) -> None:
        for s in self.special_tokens:
            if _NORMALIZERS[self.normalization](s) != s:
                raise TokenizerError(
                    f"special token {s!r} changes under {self.normalization} normalization, "
                    "so it could never be parsed"
                )
        names = SPECIAL_TOKENS + self.special_tokens
        if len(set(names)) != len(names):
            dup = sorted({s for s in names if names.count(s) > 1})
            raise TokenizerError(f"duplicate special tokens: {dup}")
        n_min = 256 + len(names)
        if (
            not isinstance(self.vocab_size, int)
            or isinstance(self.vocab_size, bool)
            or not n_min <= self.vocab_size <= MAX_VOCAB
        ):
            raise TokenizerError(
                f"vocab_size must be an int in [{n_min}, {MAX_VOCAB}] (256 bytes + "
                f"{len(names)} special tokens + merges), got {self.vocab_size!r}"
            )

    @property
    def num_merges(self) -> int:
        """Number of merges training aims for."""
        return self.vocab_size - 256 - len(SPECIAL_TOKENS) - len(self.special_tokens)

    @classmethod
    def from_dict(cls, data: Any) -> BpeTokenizerConfig:
        """Build from parsed JSON; unknown keys are an error."""
        if isinstance(data, dict):  # this wording predates ConfigMixin's; users match it
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise TokenizerError(f"unknown tokenizer config keys: {unknown}")
        return super().from_dict(data)
