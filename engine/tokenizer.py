"""Byte-level BPE tokenizer, written from scratch (no ``tokenizers`` library).

Pipeline for both training and encoding::

    text --normalize--> text' --split with a GPT-4-style regex--> pre-tokens
         --UTF-8 bytes--> byte ids 0..255 --BPE merges by rank--> token ids

Vocabulary layout (ids):

* ``0..255``: the 256 single bytes (so every string encodes; there is no UNK),
* ``256..256+M-1``: one token per merge, in the order the merges were learned
  (the *rank* of a merged token is its id),
* then the special tokens: ``<|bos|> <|eos|> <|pad|> <|user|> <|assistant|> <|system|>
  <|end|>`` followed by the user-defined ones from ``BpeTokenizerConfig.special_tokens``.

The config, the normalizations (``"nfc"``, ``"ascii"``) and the pre-tokenizer pattern live
in :mod:`.tokenizer_config`; ``decode(encode(s)) == tokenizer.normalize(s)`` for every
``str`` ``s``. Learning the merges lives in :mod:`.bpe_trainer`, applying them to one
pre-token in :mod:`.bpe_encoder`; this module ties them together (encode, decode, the chat
template, ``tokenizer.json``).

Training tie rule (the one total order used to pick each merge)::

    the pair with the highest count wins; among equal counts, the smallest pair of ids
    (left id, then right id) wins.

Example, ``"aaabdaaabac"`` with 3 merges: ``(97, 97) -> 256`` (count 4); then
``(97, 98)`` and ``(256, 97)`` both count 2 and the smaller pair ``(97, 98) -> 257`` wins;
then ``(256, 257) -> 258``. The text encodes to ``[258, 100, 258, 97, 99]``.

Encoding rule (identical to ``tiktoken`` given ``mergeable_ranks()``): a pre-token whose
bytes are a token becomes that token; otherwise, starting from its bytes, repeatedly merge
the adjacent pair whose concatenation is the token with the lowest rank (leftmost on ties)
until no adjacent concatenation is a token. Long pre-tokens cost O(n log n), not O(n^2).

Special-token text in ``encode`` input is encoded as plain text unless it is explicitly
allowed (``allowed_special="all"`` or a set of names), so a prompt cannot inject control
tokens. Training never sees special tokens.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import regex

from .bpe_encoder import merge_bytes, pair_ranks
from .bpe_trainer import learn_merges, words_from_counts
from .tokenizer_config import (
    _NORMALIZERS,
    GPT4_PATTERN,
    SPECIAL_TOKENS,
    BpeTokenizerConfig,
    TokenizerError,
    _compile_pattern,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GPT4_PATTERN",
    "SPECIAL_TOKENS",
    "TIE_RULE",
    "BpeTokenizer",
    "BpeTokenizerConfig",
    "TokenizerError",
]

FORMAT_NAME = "tritonlm.bpe_tokenizer"
FORMAT_VERSION = 1

TIE_RULE = "max_count_then_min_pair_ids"
_TIE_RULE_TEXT = "highest pair count first; equal counts: smallest (left id, right id) pair first"

_ROLES = ("system", "user", "assistant")
_CACHE_MAX_PIECE = 256  # pre-tokens longer than this (in chars) are not cached
_CACHE_SIZE = 1 << 16  # at most this many cached pre-tokens


def _count_pretokens(
    texts: Iterable[str], normalize: Callable[[str], str], findall: Callable[[str], list]
) -> Counter:
    """How often each pre-token occurs in ``texts`` (normalized, then split)."""
    counts: Counter = Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{i} is {type(text).__name__}, not str")
        text = normalize(text)
        pieces = findall(text)
        if sum(map(len, pieces)) != len(text):
            raise TokenizerError("pattern skipped characters of a training text")
        counts.update(pieces)
    return counts


# --------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------


class BpeTokenizer:
    """A trained byte-level BPE tokenizer. Build with ``train``, ``load`` or ``from_dict``."""

    def __init__(
        self,
        config: BpeTokenizerConfig,
        merges: Sequence[tuple[int, int]],
    ) -> None:
        if not isinstance(config, BpeTokenizerConfig):
            raise TokenizerError("config must be a BpeTokenizerConfig")
        self.config = config
        token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        encoder: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
        for r, pair in enumerate(merges):
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not all(type(x) is int for x in pair)
            ):
                raise TokenizerError(f"merge #{r} must be a pair of ints, got {pair!r}")
            a, b = pair
            new_id = 256 + r
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise TokenizerError(
                    f"merge #{r} ({a}, {b}) refers to an id that is not defined before {new_id}"
                )
            mb = token_bytes[a] + token_bytes[b]
            if mb in encoder:
                raise TokenizerError(f"merge #{r} ({a}, {b}) duplicates token {encoder[mb]}")
            encoder[mb] = new_id
            token_bytes.append(mb)
        self._merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        n_tokens = len(token_bytes)
        if n_tokens + len(SPECIAL_TOKENS) + len(config.special_tokens) > config.vocab_size:
            raise TokenizerError(
                f"{len(merges)} merges do not fit config.vocab_size={config.vocab_size}"
            )
        self._encoder = encoder  # bytes -> id, ordinary tokens only (= tiktoken ranks)
        self._special: dict[str, int] = {
            name: n_tokens + i for i, name in enumerate(SPECIAL_TOKENS + config.special_tokens)
        }
        self._decoder: dict[int, bytes] = dict(enumerate(token_bytes))
        for name, i in self._special.items():
            self._decoder[i] = name.encode("utf-8")
        self._token_bytes = token_bytes
        self._pair_rank = pair_ranks(token_bytes, encoder)
        self._normalize = _NORMALIZERS[config.normalization]
        self._findall = _compile_pattern(config.pattern).findall
        self._check_cover = config.pattern != GPT4_PATTERN
        names = sorted(self._special, key=lambda s: (-len(s), s))
        self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in names) + ")")
        self._cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        config: BpeTokenizerConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BpeTokenizer:
        """Train on ``texts`` (any iterable of str). ``progress(done, total)`` is called
        about 200 times during the merge phase (``total`` = merges aimed for)."""
        config = config or BpeTokenizerConfig()
        if isinstance(texts, str):
            texts = [texts]
        normalize = _NORMALIZERS[config.normalization]
        findall = _compile_pattern(config.pattern).findall
        piece_counts = _count_pretokens(texts, normalize, findall)
        words, freqs = words_from_counts(piece_counts)  # deterministic order
        del piece_counts
        merges = learn_merges(words, freqs, config.num_merges, config.min_frequency, progress)
        return cls(config, merges)

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens (may be < config.vocab_size
        if training ran out of pairs)."""
        return len(self._decoder)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """Merges in rank order; merge ``r`` creates id ``256 + r``."""
        return list(self._merges)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (built-ins first, then user-defined)."""
        return dict(self._special)

    @property
    def bos_id(self) -> int:
        return self._special["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self._special["<|pad|>"]

    @property
    def user_id(self) -> int:
        return self._special["<|user|>"]

    @property
    def assistant_id(self) -> int:
        return self._special["<|assistant|>"]

    @property
    def system_id(self) -> int:
        return self._special["<|system|>"]

    @property
    def end_id(self) -> int:
        return self._special["<|end|>"]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token gives its UTF-8 text)."""
        try:
            return self._decoder[token_id]
        except (KeyError, TypeError):
            raise TokenizerError(
                f"token id {token_id!r} is out of range [0, {self.vocab_size})"
            ) from None

    def mergeable_ranks(self) -> dict[bytes, int]:
        """bytes -> rank (= id) of every ordinary token, as ``tiktoken.Encoding`` wants."""
        return dict(self._encoder)

    def normalize(self, text: str) -> str:
        """The normalization ``encode`` applies (``decode(encode(s)) == normalize(s)``)."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be str, got {type(text).__name__}")
        return self._normalize(text)

    # ---------------------------------------------------------------- encoding
    def _encode_piece(self, piece: str) -> list[int]:
        bs = piece.encode("utf-8")
        if not bs:
            return []  # a user pattern may match the empty string
        t = self._encoder.get(bs)
        ids = [t] if t is not None else merge_bytes(bs, self._pair_rank)
        if len(piece) <= _CACHE_MAX_PIECE:
            cache = self._cache
            if len(cache) >= _CACHE_SIZE:
                # drop the oldest half (dicts keep insertion order): amortized O(1)
                for old in list(cache)[: _CACHE_SIZE // 2]:
                    del cache[old]
            cache[piece] = ids
        return ids

    def _encode_normalized(self, text: str) -> list[int]:
        pieces = self._findall(text)
        # the default pattern matches every character; a custom one is checked each time
        if self._check_cover and sum(map(len, pieces)) != len(text):
            raise TokenizerError("the tokenizer's pattern skipped characters of the text")
        get = self._cache.get
        miss = self._encode_piece
        # cached id lists are never empty, so `or` only calls miss() on a cache miss
        return list(chain.from_iterable([get(p) or miss(p) for p in pieces]))

    def encode(self, text: str, allowed_special: str | Iterable[str] | None = None) -> list[int]:
        """Encode ``text`` (normalized first) to ids.

        ``allowed_special``: ``None`` (default): special-token text is encoded as plain text;
        ``"all"``: every special token's text becomes its id; a set of special token texts:
        only those are parsed. Unknown names raise ``TokenizerError``.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text must be str, got {type(text).__name__}")
        text = self._normalize(text)
        if not allowed_special:
            return self._encode_normalized(text)
        if allowed_special == "all":
            allowed = set(self._special)
        elif isinstance(allowed_special, str):
            raise TokenizerError(
                f"allowed_special must be None, 'all' or a set of special tokens, "
                f"got {allowed_special!r}"
            )
        else:
            allowed = set(allowed_special)
            unknown = sorted(allowed - set(self._special))
            if unknown:
                raise TokenizerError(f"unknown special tokens in allowed_special: {unknown}")
        out: list[int] = []
        pending: list[str] = []  # plain text between allowed specials
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1 and part in allowed:
                if pending:
                    out += self._encode_normalized("".join(pending))
                    pending = []
                out.append(self._special[part])
            elif part:
                pending.append(part)
        if pending:
            out += self._encode_normalized("".join(pending))
        return out

    def encode_document(self, text: str) -> list[int]:
        """``[bos] + encode(text) + [eos]``, the pretraining document format."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a conversation into ``(ids, mask)``.

        Template: ``<|bos|>`` then, per message, ``<|role|> content <|end|>`` (content is
        encoded as plain text: special-token text in it is not parsed). With
        ``add_generation_prompt`` the ids end with ``<|assistant|>`` (the model writes the
        answer and ``<|end|>``). ``mask[i] == 1`` exactly on assistant content tokens and
        their closing ``<|end|>``; 0 elsewhere.
        """
        if not isinstance(messages, list | tuple):
            raise TokenizerError(f"messages must be a list, got {type(messages).__name__}")
        role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        ids = [self.bos_id]
        mask = [0]
        end = self.end_id
        for n, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise TokenizerError(f"message #{n} must be a dict, got {type(msg).__name__}")
            role = msg.get("role")
            content = msg.get("content")
            if role not in role_ids:
                raise TokenizerError(f"message #{n} has role {role!r}; expected one of {_ROLES}")
            if not isinstance(content, str):
                raise TokenizerError(f"message #{n} content must be str, got {content!r}")
            body = self.encode(content)
            flag = 1 if role == "assistant" else 0
            ids.append(role_ids[role])
            mask.append(0)
            ids += body
            ids.append(end)
            mask += [flag] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    # ---------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of ``ids`` (special tokens give their text)."""
        if not isinstance(ids, list | tuple):
            ids = list(ids)
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            pass
        for i in ids:
            try:
                self._decoder[i]
            except (KeyError, TypeError):
                raise TokenizerError(
                    f"cannot decode id {i!r}: ids must be ints in [0, {self.vocab_size})"
                ) from None
        raise TokenizerError("cannot decode ids")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of ``tokenizer.json``)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "normalization": self.config.normalization,
            "pattern": self.config.pattern,
            "tie_rule": TIE_RULE,
            "tie_rule_text": _TIE_RULE_TEXT,
            "config": self.config.to_dict(),
            "special_tokens": [[name, i] for name, i in self._special.items()],
            "merges": [[a, b] for a, b in self._merges],
        }

    @classmethod
    def from_dict(cls, d: Any) -> BpeTokenizer:
        """Rebuild from ``to_dict`` output; anything malformed raises ``TokenizerError``."""
        if not isinstance(d, dict):
            raise TokenizerError(
                f"not a tritonlm tokenizer: expected a JSON object, got {type(d).__name__}"
            )
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise TokenizerError(
                f"not a tritonlm tokenizer: format is {fmt!r}, expected {FORMAT_NAME!r}"
            )
        version = d.get("version")
        if type(version) is not int or version < 1:
            raise TokenizerError(f"tokenizer format version must be an int >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise TokenizerError(
                f"tokenizer format version {version} is newer than this program supports "
                f"({FORMAT_VERSION}); upgrade tritonlm"
            )
        required = ("config", "merges", "special_tokens", "normalization", "pattern", "tie_rule")
        missing = [k for k in required if k not in d]
        if missing:
            raise TokenizerError(f"tokenizer is missing keys: {missing}")
        if d["tie_rule"] != TIE_RULE:
            raise TokenizerError(f"unknown tie rule {d['tie_rule']!r}, expected {TIE_RULE!r}")
        config = BpeTokenizerConfig.from_dict(d["config"])
        if d["normalization"] != config.normalization or d["pattern"] != config.pattern:
            raise TokenizerError("tokenizer normalization/pattern disagree with its config")
        merges = d["merges"]
        if not isinstance(merges, list):
            raise TokenizerError("tokenizer merges must be a list of [left, right] id pairs")
        tok = cls(config, merges)
        specials = d["special_tokens"]
        expected = [[name, i] for name, i in tok._special.items()]
        if not isinstance(specials, list) or [list(x) for x in specials] != expected:
            raise TokenizerError(
                "tokenizer special_tokens do not match the config and merges "
                f"(expected {expected}, got {specials!r})"
            )
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise TokenizerError(
                f"tokenizer vocab_size {d['vocab_size']!r} does not match its merges and "
                f"special tokens ({tok.vocab_size})"
            )
        return tok

    def to_json(self) -> str:
        """Deterministic JSON text: header keys one per line, one merge per line."""
        d = self.to_dict()
        merges = d.pop("merges")
        head = json.dumps(d, indent=2, ensure_ascii=True)
        body = ",\n".join(f"    [{a}, {b}]" for a, b in merges)
        merges_txt = "[\n" + body + "\n  ]" if merges else "[]"
        return head[:-2] + ',\n  "merges": ' + merges_txt + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (UTF-8, deterministic bytes)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BpeTokenizer:
        """Read a file written by ``save``; errors name the file and the problem."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(
                f"tokenizer file {path} is not valid JSON (truncated or corrupt?): {e}"
            ) from None
        except (RecursionError, ValueError) as e:  # nested too deeply, an oversized integer
            raise TokenizerError(f"tokenizer file {path}: unreadable JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return (
            f"BpeTokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"normalization={self.config.normalization!r})"
        )
