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

Normalization (``BpeTokenizerConfig.normalization``):

* ``"nfc"`` (default): lone surrogates (U+D800..U+DFFF, which cannot be UTF-8 encoded)
  are replaced by U+FFFD, then Unicode NFC is applied.
* ``"ascii"``: ASCII folding: NFKD, then every non-ASCII code point (lone surrogates
  included) is dropped. ``"Café ﬁ"`` becomes ``"Cafe fi"``.

So ``decode(encode(s)) == tokenizer.normalize(s)`` for every ``str`` ``s``.

Training tie rule (the one total order used to pick each merge)::

    the pair with the highest count wins; among equal counts, the smallest pair of ids
    (left id, then right id) wins.

Example, ``"aaabdaaabac"`` with 3 merges: ``(97, 97) -> 256`` (count 4); then
``(97, 98)`` and ``(256, 97)`` both count 2 and the smaller pair ``(97, 98) -> 257`` wins;
then ``(256, 257) -> 258``. The text encodes to ``[258, 100, 258, 97, 99]``.

Encoding rule (identical to ``tiktoken`` given ``mergeable_ranks()``): a pre-token whose
bytes are a token becomes that token; otherwise, starting from its bytes, repeatedly merge
the adjacent pair whose concatenation is the token with the lowest rank (leftmost on ties)
until no adjacent concatenation is a token. Long pre-tokens use a heap over a linked list,
so a 100,000-character run costs O(n log n), not O(n^2).

Special-token text in ``encode`` input is encoded as plain text unless it is explicitly
allowed (``allowed_special="all"`` or a set of names), so a prompt cannot inject control
tokens. Training never sees special tokens.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import regex

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

TIE_RULE = "max_count_then_min_pair_ids"
_TIE_RULE_TEXT = "highest pair count first; equal counts: smallest (left id, right id) pair first"

_ROLES = ("system", "user", "assistant")
_NORMALIZATIONS = ("nfc", "ascii")
_MAX_VOCAB = 1 << 20  # training packs a pair into one int: (left << 20) | right
_SHIFT = 20
_MASK = (1 << _SHIFT) - 1
_CACHE_MAX_PIECE = 256  # pre-tokens longer than this (in chars) are not cached
_CACHE_SIZE = 1 << 16  # at most this many cached pre-tokens
_SMALL_PIECE = 256  # pieces up to this many bytes use the simple quadratic merge loop
_NO_RANK = 1 << 40  # larger than any rank
_SURROGATES = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """Bad tokenizer config, input, or tokenizer file. The message names the problem."""


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BpeTokenizerConfig:
    """How to train a tokenizer. JSON-serializable via ``to_dict``/``from_dict``.

    vocab_size: total vocabulary size (256 bytes + merges + special tokens). Training stops
        early (smaller vocabulary) if no pair reaches ``min_frequency``.
    normalization: ``"nfc"`` or ``"ascii"`` (see the module docstring).
    pattern: pre-tokenizer regex (``regex`` package syntax); must match every character.
    special_tokens: extra user-defined special tokens, after the built-in ones.
    min_frequency: a pair must occur at least this often (weighted) to be merged.
    """

    vocab_size: int = 4096
    normalization: str = "nfc"
    pattern: str = GPT4_PATTERN
    special_tokens: tuple[str, ...] = ()
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.special_tokens, list):
            object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.normalization, str) or self.normalization not in _NORMALIZATIONS:
            raise TokenizerError(
                f"normalization must be one of {_NORMALIZATIONS}, got {self.normalization!r}"
            )
        if not isinstance(self.special_tokens, tuple) or not all(
            isinstance(s, str) and s for s in self.special_tokens
        ):
            raise TokenizerError("special_tokens must be a list of non-empty strings")
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
            or not n_min <= self.vocab_size <= _MAX_VOCAB
        ):
            raise TokenizerError(
                f"vocab_size must be an int in [{n_min}, {_MAX_VOCAB}] (256 bytes + "
                f"{len(names)} special tokens + merges), got {self.vocab_size!r}"
            )
        if (
            not isinstance(self.min_frequency, int)
            or isinstance(self.min_frequency, bool)
            or self.min_frequency < 1
        ):
            raise TokenizerError(f"min_frequency must be an int >= 1, got {self.min_frequency!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise TokenizerError("pattern must be a non-empty regex string")
        try:
            pat = regex.compile(self.pattern)
        except regex.error as e:
            raise TokenizerError(f"pattern is not a valid regex: {e}") from None
        probe = "Hello, wörld! 123 4567\n\n  \t x'll 中文 😀 e\u0301 \x00 ...\r\n"
        if "".join(pat.findall(probe)) != probe:
            raise TokenizerError(
                "pattern must match every character of the text (it must not skip any, "
                "and must not use capture groups)"
            )

    @property
    def num_merges(self) -> int:
        """Number of merges training aims for."""
        return self.vocab_size - 256 - len(SPECIAL_TOKENS) - len(self.special_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> BpeTokenizerConfig:
        if not isinstance(d, dict):
            raise TokenizerError(f"tokenizer config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TokenizerError(f"unknown tokenizer config keys: {unknown}")
        kw = dict(d)
        if "special_tokens" in kw:
            if not isinstance(kw["special_tokens"], list | tuple):
                raise TokenizerError("special_tokens must be a list of strings")
            kw["special_tokens"] = tuple(kw["special_tokens"])
        return cls(**kw)


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
# Training
# --------------------------------------------------------------------------------------


def _count_pretokens(
    texts: Iterable[str], normalize: Callable[[str], str], findall: Callable[[str], list]
) -> Counter:
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


def _learn_merges(
    words: list[list[int]],
    freqs: list[int],
    num_merges: int,
    min_frequency: int,
    progress: Callable[[int, int], None] | None,
) -> list[tuple[int, int]]:
    """Learn up to ``num_merges`` merges from unique words (byte-id lists) and counts.

    Keeps: ``counts`` (pair key -> weighted count), ``where`` (pair key -> indices of words
    that contained it; stale members are skipped), a max-heap of ``(-count, key)`` with lazy
    refresh (an entry whose count is out of date is re-pushed with the current count when
    popped; after every count increase a fresh entry is pushed). ``key = left << 20 | right``
    so heap order is exactly the tie rule: highest count, then smallest (left, right).
    A merge whose bytes equal an existing token reuses that token's id (no new id).
    """
    S = _SHIFT
    # A pair (left, right) is one int, key = left << 20 | right (ids stay below 2**20), so
    # comparing keys compares (left, right) lexicographically.
    # counts[key]: occurrences of the pair over all words, each weighted by its word's
    #   frequency. Kept exact: every merge below updates it incrementally.
    # where[key]: indices of the words that contain (or once contained) the pair. Only
    #   ever grows, except that the merged pair's set is popped; members that no longer
    #   hold the pair are found stale by scanning the word, and skipped.
    counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for wi, w in enumerate(words):
        f = freqs[wi]
        prev = w[0]
        for x in w[1:]:
            k = (prev << S) | x
            counts[k] = counts.get(k, 0) + f
            s = where.get(k)
            if s is None:
                where[k] = {wi}
            else:
                s.add(wi)
            prev = x
    # The heap holds (-count, key) candidates; heapq is a min-heap, so the top is the
    # highest count and, among equal counts, the smallest key: exactly the tie rule.
    # Lazy invalidation: counts change without touching the heap, so an entry may be out
    # of date. Invariant: every pair with count >= min_frequency has an entry whose stored
    # count is >= its true count (a decrease leaves the old, higher entry in place; an
    # increase pushes a fresh entry). Hence an entry that is popped and still current is
    # the true maximum; a popped stale entry is pushed back with its current count.
    heap = [(-c, k) for k, c in counts.items() if c >= min_frequency]
    heapq.heapify(heap)

    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    bytes_to_id: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int]] = []
    report_every = max(1, num_merges // 200)
    heappop, heappush = heapq.heappop, heapq.heappush

    while len(merges) < num_merges and heap:
        negc, key = heappop(heap)
        c = counts.get(key, 0)
        if c != -negc:  # stale: requeue with the current count (dropped if now too rare)
            if c >= min_frequency:
                heappush(heap, (-c, key))
            continue
        if c < min_frequency:
            break
        # (a, b) is the most frequent pair: merge it into token m everywhere.
        a, b = key >> S, key & _MASK
        mb = token_bytes[a] + token_bytes[b]
        m = bytes_to_id.get(mb)
        if m is None:
            m = len(token_bytes)
            token_bytes.append(mb)
            bytes_to_id[mb] = m
            merges.append((a, b))
            if progress is not None and (len(merges) % report_every == 0):
                progress(len(merges), num_merges)
        # Pairs whose count grew during this merge (they need a fresh heap entry); a dict
        # keeps them unique in insertion order (deterministic).
        touched: dict[int, None] = {}
        for wi in where.pop(key, ()):
            w = words[wi]
            n = len(w)
            # find the first occurrence quickly; stale index entries have none
            i = 0
            found = False
            while True:
                try:
                    i = w.index(a, i)
                except ValueError:
                    break
                if i + 1 < n and w[i + 1] == b:
                    found = True
                    break
                i += 1
            if not found:
                continue
            # Rewrite the word left to right, replacing each non-overlapping (a, b) by m,
            # and update counts for exactly the pairs that appear or disappear. For
            # "x a b y": (x, a), (a, b) and (b, y) lose f; (x, m) and (m, y) gain f.
            f = freqs[wi]
            nw = w[:i]
            last_end = -1  # index just past the latest merge in this word
            while i < n:
                x = w[i]
                if x == a and i + 1 < n and w[i + 1] == b:
                    counts[key] -= f
                    # Left neighbour pair (w[i-1], a) disappears, unless the previous merge
                    # ended right here: then that pair was (b, a), already taken off below
                    # as the previous merge's right neighbour.
                    if i > 0 and last_end != i:
                        k = (w[i - 1] << S) | a
                        counts[k] -= f
                    # Right neighbour pair (b, w[i+2]) disappears. (For "a a a" merging
                    # (a, a) this is the overlapping (a, a) itself, correctly removed.)
                    if i + 2 < n:
                        k = (b << S) | w[i + 2]
                        counts[k] -= f
                    # New pair with what is now on the left: a plain token or, after an
                    # adjacent merge, m itself (the pair (m, m)).
                    if nw:
                        k = (nw[-1] << S) | m
                        counts[k] = counts.get(k, 0) + f
                        touched[k] = None
                    nw.append(m)
                    i += 2
                    last_end = i
                else:
                    if last_end == i:  # first token after a merge: new pair (m, x)
                        k = (m << S) | x
                        counts[k] = counts.get(k, 0) + f
                        touched[k] = None
                    nw.append(x)
                    i += 1
            words[wi] = nw
            # Index the word under every new pair it now holds (the pairs involving m);
            # the pairs it lost keep it as a stale member, skipped when they merge.
            prev = nw[0]
            for x in nw[1:]:
                if x == m or prev == m:
                    k = (prev << S) | x
                    s = where.get(k)
                    if s is None:
                        where[k] = {wi}
                    else:
                        s.add(wi)
                prev = x
        for k in touched:  # counts that grew get a fresh entry (the heap invariant)
            c2 = counts[k]
            if c2 >= min_frequency:
                heappush(heap, (-c2, k))
    if progress is not None:
        progress(len(merges), num_merges)
    return merges


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
        # (left, right) -> id of the token whose bytes are left + right, for every way of
        # splitting every merged token into two tokens (tiktoken's rank semantics).
        pair_rank: dict[tuple[int, int], int] = {}
        for t in range(256, n_tokens):
            tb = token_bytes[t]
            for cut in range(1, len(tb)):
                left = encoder.get(tb[:cut])
                if left is not None:
                    right = encoder.get(tb[cut:])
                    if right is not None:
                        pair_rank[(left, right)] = t
        self._pair_rank = pair_rank
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
        # deterministic word order: sort by string (never hash order)
        words: list[list[int]] = []
        freqs: list[int] = []
        for piece in sorted(piece_counts):
            bs = piece.encode("utf-8")
            if len(bs) >= 2:
                words.append(list(bs))
                freqs.append(piece_counts[piece])
        del piece_counts
        merges = _learn_merges(words, freqs, config.num_merges, config.min_frequency, progress)
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
    def _bpe(self, bs: bytes) -> list[int]:
        """Merge the bytes of one pre-token (not itself a token) by rank."""
        get = self._pair_rank.get
        if len(bs) <= _SMALL_PIECE:
            # tiktoken's loop: ranks[i] = rank of parts[i] + parts[i+1]; min() and
            # index() run in C, so each merge costs one short scan plus two lookups.
            parts = list(bs)
            ranks = list(map(get, zip(bs, bs[1:], strict=False), repeat(_NO_RANK)))
            while True:
                r = min(ranks)
                if r == _NO_RANK:
                    return parts
                i = ranks.index(r)  # leftmost lowest rank
                parts[i] = r
                del parts[i + 1]
                del ranks[i]
                if i > 0:
                    ranks[i - 1] = get((parts[i - 1], r), _NO_RANK)
                if i < len(ranks):
                    ranks[i] = get((r, parts[i + 1]), _NO_RANK)
                elif not ranks:
                    return parts
        # Long pre-token: doubly linked list of parts indexed by start byte offset, and a
        # heap of (rank, start). An entry is acted on only if the pair now starting there
        # still has that rank (otherwise it is stale); every live pair has an entry.
        n = len(bs)
        tok = list(bs)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = []
        prev = tok[0]
        for i in range(1, n):
            x = tok[i]
            r = get((prev, x))
            if r is not None:
                heap.append((r, i - 1))
            prev = x
        heapq.heapify(heap)
        heappop, heappush = heapq.heappop, heapq.heappush
        while heap:
            r, i = heappop(heap)
            j = nxt[i]
            if j >= n or tok[i] < 0 or get((tok[i], tok[j])) != r:
                continue  # stale
            tok[i] = r
            tok[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                r2 = get((r, tok[k]))
                if r2 is not None:
                    heappush(heap, (r2, i))
            p = prv[i]
            if p >= 0:
                r2 = get((tok[p], r))
                if r2 is not None:
                    heappush(heap, (r2, p))
        out = []
        i = 0
        while i < n:
            out.append(tok[i])
            i = nxt[i]
        return out

    def _encode_piece(self, piece: str) -> list[int]:
        bs = piece.encode("utf-8")
        if not bs:
            return []  # a user pattern may match the empty string
        t = self._encoder.get(bs)
        ids = [t] if t is not None else self._bpe(bs)
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
        try:
            return cls.from_dict(d)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return (
            f"BpeTokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"normalization={self.config.normalization!r})"
        )
