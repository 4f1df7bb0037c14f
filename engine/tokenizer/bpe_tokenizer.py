"""Byte-level BPE tokenizer, written from scratch (no ``tokenizers`` library).

Pipeline for both training and encoding::

    text --normalize--> text' --split with a GPT-4-style regex--> pre-tokens
         --UTF-8 bytes--> byte ids 0..255 --BPE merges by rank--> token ids

Vocabulary layout (ids):

* ``0..255``: the 256 single bytes (so every string encodes; there is no UNK),
* ``256..256+M-1``: one token per merge, in the order the merges were learned
  (the *rank* of a merged token is its id),
* then the special tokens: ``<|bos|> <|eos|> <|pad|> <|user|> <|assistant|> <|system|>
  <|end|>`` followed by the user-defined ones from ``BpeTokenizerConfig.special_tokens``
  (an imported tokenizer has only its own, each mapped to a role or to none).

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
With ``merge_rule="merges"`` (tokenizers imported from Hugging Face) only the listed merges
are pairs: the same loop, but ``"abc"`` made by ``ab + c`` never forms from ``a + bc``.

Special-token text in ``encode`` input is encoded as plain text unless it is explicitly
allowed (``allowed_special="all"`` or a set of names), so a prompt cannot inject control
tokens. Training never sees special tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import regex

from .bpe_encoder import merge_bytes, pair_ranks
from .bpe_trainer import learn_merges, words_from_counts
from .chat_template import chat_segments, chat_tail, render_ids
from .pretoken_count import count_pretokens
from .tokenizer_config import (
    GPT4_PATTERN,
    NORMALIZERS,
    SPECIAL_TOKENS,
    BpeTokenizerConfig,
    TokenizerError,
    compile_pattern,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TIE_RULE", "BpeTokenizer"]

FORMAT_NAME = "tritonlm.bpe_tokenizer"
FORMAT_VERSION = 1

TIE_RULE = "max_count_then_min_pair_ids"
_TIE_RULE_TEXT = "highest pair count first; equal counts: smallest (left id, right id) pair first"

_ROLES = ("system", "user", "assistant")
_CACHE_MAX_PIECE = 256  # pre-tokens longer than this (in chars) are not cached
_CACHE_SIZE = 1 << 16  # at most this many cached pre-tokens


def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{i} is {type(text).__name__}, not str")
        yield text


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
        specials = config.all_special_tokens
        if n_tokens + len(specials) > config.vocab_size:
            raise TokenizerError(
                f"{len(merges)} merges do not fit config.vocab_size={config.vocab_size}"
            )
        self._encoder = encoder  # bytes -> id, ordinary tokens only (= tiktoken ranks)
        self._special: dict[str, int] = {name: n_tokens + i for i, name in enumerate(specials)}
        self._roles = {r: self._special[t] for r, t in config.role_tokens.items()}
        self._decoder: dict[int, bytes] = dict(enumerate(token_bytes))
        for name, i in self._special.items():
            self._decoder[i] = name.encode("utf-8")
        self._token_bytes = token_bytes
        if config.merge_rule == "merges":  # only the listed merges; a pair's rank = its id
            self._pair_rank = {pair: 256 + r for r, pair in enumerate(self._merges)}
        else:
            self._pair_rank = pair_ranks(token_bytes, encoder)
        self._normalize = NORMALIZERS[config.normalization]
        self._findall = compile_pattern(config.pattern).findall
        self._check_cover = config.pattern != GPT4_PATTERN
        names = sorted(self._special, key=lambda s: (-len(s), s)) or ["(?!)"]  # (?!): none
        escaped = [regex.escape(s) if s in self._special else s for s in names]
        self._special_re = regex.compile("(" + "|".join(escaped) + ")")
        self._cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        config: BpeTokenizerConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
        workers: int = 1,
        count_progress: Callable[[int, int], None] | None = None,
    ) -> BpeTokenizer:
        """Train on ``texts`` (any iterable of str, read once as a stream).

        Pre-tokens are counted on ``workers`` processes (engine/pretoken_count.py; the
        result is the same for any number). ``count_progress(chars, 0)`` follows the
        counting, ``progress(done, total)`` the merges (about 200 calls; ``total`` =
        merges aimed for)."""
        config = config or BpeTokenizerConfig()
        if isinstance(texts, str):
            texts = [texts]
        piece_counts = count_pretokens(_checked_texts(texts), config.normalization,
                                       config.pattern, workers, count_progress)  # fmt: skip
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

    # Role ids: ints for our own tokenizers; an imported one may lack a role (then None):
    # SmolLM has no pad token, ChatML has no <|user|> token.
    bos_id = property(lambda self: self._roles.get("bos"), doc="id of <|bos|> or None")
    eos_id = property(lambda self: self._roles.get("eos"), doc="end of document")
    pad_id = property(lambda self: self._roles.get("pad"), doc="padding")
    user_id = property(lambda self: self._roles.get("user"), doc="opens a user turn")
    assistant_id = property(lambda self: self._roles.get("assistant"), doc="assistant turn")
    system_id = property(lambda self: self._roles.get("system"), doc="opens a system turn")
    end_id = property(lambda self: self._roles.get("end"), doc="end of a turn")

    @property
    def merge_rule(self) -> str:
        """``"ranks"`` (tiktoken's rule) or ``"merges"`` (Hugging Face's), see the module doc."""
        return self.config.merge_rule

    def role_token(self, role: str) -> str | None:
        """The text of the special token playing ``role`` (``ROLES``), or None."""
        return self.config.role_tokens.get(role)

    def stop_ids(self) -> list[int]:
        """Ids that end an answer: end of document, end of turn, then every other control
        token (built-in ones for our tokenizers, all special tokens for imported ones)."""
        first = [i for r in ("eos", "end") if (i := self._roles.get(r)) is not None]
        names = SPECIAL_TOKENS if self.config.builtin_specials else self._special
        rest = sorted(self._special[t] for t in names if t in self._special)
        return list(dict.fromkeys(first + rest))

    def pair_ranks(self) -> dict[tuple[int, int], int]:
        """(left id, right id) -> id of the token they merge into, under ``merge_rule``."""
        return dict(self._pair_rank)

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
        """``[bos] + encode(text) + [eos]``, the pretraining document format (an imported
        tokenizer without a bos or eos role leaves that end out)."""
        bos, eos = self._roles.get("bos"), self._roles.get("eos")
        return [
            *([bos] if bos is not None else []),
            *self.encode(text),
            *([eos] if eos is not None else []),
        ]

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a conversation into ``(ids, mask)`` with the tokenizer's chat template.

        Ours (``"tritonlm"``): ``<|bos|>`` then, per message, ``<|role|> content <|end|>``;
        with ``add_generation_prompt`` the ids end with ``<|assistant|>`` (the model writes
        the answer and ``<|end|>``). ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``.
        Content is encoded as plain text (special-token text in it is not parsed).
        ``mask[i] == 1`` exactly on tokens of assistant content and their closing end
        token; 0 elsewhere.
        """
        if not isinstance(messages, list | tuple):
            raise TokenizerError(f"messages must be a list, got {type(messages).__name__}")
        for n, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise TokenizerError(f"message #{n} must be a dict, got {type(msg).__name__}")
            role = msg.get("role")
            content = msg.get("content")
            if role not in _ROLES:
                raise TokenizerError(f"message #{n} has role {role!r}; expected one of {_ROLES}")
            if not isinstance(content, str):
                raise TokenizerError(f"message #{n} content must be str, got {content!r}")
        if self.config.chat_template == "none":
            raise TokenizerError(
                "this tokenizer has no chat template we can render (raw mode only)"
            )
        return render_ids(self, chat_segments(self.config, messages, add_generation_prompt))

    def chat_tail_length(self) -> int:
        """How many ids the chat template puts after the last message's content when it adds
        the generation prompt (``<|end|> <|assistant|>``: 2); prompts cut to fit keep them."""
        return len(render_ids(self, chat_tail(self.config))[0])

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
