"""Tokenize a corpus once into memory-mapped files on disk, keyed by data + tokenizer.

A cache entry is a directory ``<cache_dir>/<kind>-<key[:16]>/`` holding raw little-endian
arrays plus ``meta.json`` (dtypes, lengths, counts, the full key)::

    pretrain  tokens.bin    <|bos|> doc <|eos|> for every document, concatenated
              doc_offsets.bin  int64 [n_docs + 1]: document i is tokens[off[i]:off[i+1]]
              doc_bytes.bin    int64 [n_docs]: UTF-8 bytes of each document (bits per byte)
    sft       tokens.bin    render_chat ids of every conversation, concatenated
              mask.bin      uint8, 1 where the token is assistant output (trained on)
              doc_offsets.bin / doc_bytes.bin as above (bytes = message contents)

Tokens are uint16 when the vocabulary fits (< 65536 ids), else uint32. Documents are
encoded one at a time and streamed to disk in chunks, so a large corpus never sits in RAM
as Python ints. The entry is written to a temporary sibling directory and renamed into
place, so a crash leaves no half-written cache; a second build with the same data and
tokenizer finds the entry and only maps it.

    >>> cache = build_pretrain_cache(["a b", "c"], tok, "runs/.cache")   # doctest: +SKIP
    >>> cache.tokens[: cache.doc_offsets[1]]       # <|bos|> a b <|eos|>   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, fsync_dir
from ..errors import EngineError
from ..run_lock import exclusive
from ..tokenizer.parallel_encode import encode_documents

FORMAT_VERSION = 1
CHUNK_TOKENS = 1 << 20  # characters of text per encoded batch (about as many tokens)


class TokenCacheError(EngineError, ValueError):
    """A cache entry that cannot be built or read (the message names the path)."""


@dataclass
class TokenCache:
    """A memory-mapped token cache entry (read-only arrays).

    ``mask`` is None for pretraining caches. ``n_bytes`` is the total UTF-8 size of the
    source text, used for bits per byte.
    """

    path: Path
    kind: str
    key: str
    tokens: np.ndarray
    doc_offsets: np.ndarray
    doc_bytes: np.ndarray
    mask: np.ndarray | None
    vocab_size: int
    info: dict = field(default_factory=dict)  # "engine" that encoded it, corpus "summary"

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def n_bytes(self) -> int:
        return int(self.doc_bytes.sum())


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32.

    >>> token_dtype(512), token_dtype(100_000)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def cache_key(kind: str, items: Iterable, tokenizer_json: str) -> str:
    """sha256 over the cache format, the kind, the tokenizer JSON and every item's content.

    Items are hashed as length-prefixed UTF-8 (chats as canonical JSON), so ["ab"] and
    ["a", "b"] differ.
    """
    h = hashlib.sha256()
    h.update(f"tritonlm-token-cache/{FORMAT_VERSION}/{kind}\n".encode())
    h.update(hashlib.sha256(tokenizer_json.encode()).digest())
    for item in items:
        s = item if isinstance(item, str) else json.dumps(item, sort_keys=True, ensure_ascii=False)
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Canonical JSON of the tokenizer (its ``to_dict()``), the tokenizer part of the key."""
    return json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False)


def build_pretrain_cache(
    texts: Sequence[str],
    tokenizer,
    cache_dir: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    engine: str = "auto",
) -> TokenCache:
    """Encode each text as ``<|bos|> text <|eos|>`` into a cache entry (or reuse it).

    ``progress(done, total)`` (documents) is called as batches are written. The entry is
    the same bytes for any ``workers`` and ``engine`` (engine/parallel_encode.py).
    """
    key = cache_key("pretrain", texts, tokenizer_fingerprint(tokenizer))
    n = len(texts)

    def batches(dtype):
        name, out = encode_documents(texts, tokenizer, dtype, workers, engine, CHUNK_TOKENS)
        done = 0
        for batch in out:
            done += len(batch[1])
            if progress is not None:
                progress(done, n)
            yield batch
        return {"engine": name}

    return _build("pretrain", key, tokenizer, cache_dir, batches)


def build_corpus_cache(
    corpus,
    tokenizer,
    cache_dir: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    engine: str = "auto",
) -> TokenCache:
    """Stream a `TextCorpus` (engine/corpus.py) into a pretraining cache entry.

    The key covers the files' bytes (`TextCorpus.fingerprint`), so an unchanged corpus is
    found again without reading it. ``progress(done, total)`` counts on-disk bytes read.
    ``meta["summary"]`` says what was read and skipped, for the front end to print.
    """
    from .corpus import summary

    fp = corpus.fingerprint(cache_dir, threads=max(1, workers))
    key = _key("pretrain-corpus", fp, tokenizer_fingerprint(tokenizer))
    total = corpus.total_bytes()

    def batches(dtype):
        found = corpus.open()
        docs = corpus.documents(found)
        name, out = encode_documents(docs, tokenizer, dtype, workers, engine, CHUNK_TOKENS)
        n_docs = 0
        for batch in out:
            n_docs += len(batch[1])
            if progress is not None:
                progress(found.position(), total)
            yield batch
        if progress is not None:
            progress(total, total)
        return {"engine": name, "summary": summary(found.result, n_docs)}

    return _build("pretrain", key, tokenizer, cache_dir, batches)


def build_chat_cache(
    chats: Sequence[list[dict]],
    tokenizer,
    cache_dir: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
) -> TokenCache:
    """Render each conversation with the chat template; keep ids and the assistant mask."""
    key = cache_key("sft", chats, tokenizer_fingerprint(tokenizer))
    n = len(chats)

    def batches(dtype):
        for i, messages in enumerate(chats):
            ids, mask = tokenizer.render_chat(messages)
            n_bytes = sum(len(m["content"].encode("utf-8")) for m in messages)
            arr = np.asarray(ids, dtype=np.int64)
            m = np.asarray(mask, dtype=np.uint8)
            if m.shape != arr.shape:
                raise TokenCacheError(f"item {i}: mask length differs from ids length")
            yield arr, np.array([arr.size], np.int64), np.array([n_bytes], np.int64), m
            if progress is not None and (i % 256 == 0 or i + 1 == n):
                progress(i + 1, n)
        return {"engine": "tritonlm"}

    return _build("sft", key, tokenizer, cache_dir, batches)


def open_cache(path: str | os.PathLike) -> TokenCache:
    """Map an existing cache entry directory (raises TokenCacheError when broken)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise TokenCacheError(f"{path}: unreadable token cache ({e})") from None
    if not isinstance(meta, dict):
        raise TokenCacheError(f"{path}: unreadable token cache (meta.json is not an object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenCacheError(f"{path}: token cache format {meta.get('format_version')!r}")
    n_tok, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
    dtype = np.dtype(meta["token_dtype"])

    def mmap(name, dt, n):
        file = path / name
        expected = n * np.dtype(dt).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise TokenCacheError(f"{file}: missing or wrong size (expected {expected} bytes)")
        if n == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(file, dtype=dt, mode="r", shape=(n,))

    tokens = mmap("tokens.bin", dtype, n_tok)
    offsets = mmap("doc_offsets.bin", np.int64, n_docs + 1)
    doc_bytes = mmap("doc_bytes.bin", np.int64, n_docs)
    mask = mmap("mask.bin", np.uint8, n_tok) if meta["kind"] == "sft" else None
    if int(offsets[-1]) != n_tok:
        raise TokenCacheError(f"{path}: document offsets do not match the token count")
    return TokenCache(
        path=path,
        kind=meta["kind"],
        key=meta["key"],
        tokens=tokens,
        doc_offsets=offsets,
        doc_bytes=doc_bytes,
        mask=mask,
        vocab_size=int(meta["vocab_size"]),
        info={k: meta[k] for k in ("engine", "summary") if isinstance(meta.get(k), str)},
    )


# ----------------------------------------------------------------------------- internals


def _key(tag: str, data_digest: str, tokenizer_json: str) -> str:
    h = hashlib.sha256(f"tritonlm-token-cache/{FORMAT_VERSION}/{tag}\n".encode())
    h.update(hashlib.sha256(tokenizer_json.encode()).digest())
    h.update(data_digest.encode())
    return h.hexdigest()


def _build(kind, key, tokenizer, cache_dir, batches) -> TokenCache:
    final = Path(cache_dir) / f"{kind}-{key[:16]}"
    # Two runs tokenizing the same data: the second waits, then reuses the first's entry.
    with exclusive(final, "token cache entry", wait=True):
        cache = _reuse(final, key)
        if cache is None:
            _remove_dead_builds(final)
            _write(final, kind, key, tokenizer.vocab_size, batches)
            cache = open_cache(final)
    return cache


def _reuse(final: Path, key: str) -> TokenCache | None:
    """The finished entry at ``final``, or None (a stale or broken one is removed)."""
    if not final.is_dir():
        return None
    try:
        cache = open_cache(final)
        if cache.key == key:
            return cache
    except (TokenCacheError, KeyError, TypeError, ValueError):  # damaged: build it again
        pass
    shutil.rmtree(final, ignore_errors=True)
    return None


def _remove_dead_builds(final: Path) -> None:
    """Temporary directories of builds that died (a crash, SIGKILL): we hold the entry's
    lock, so no live build owns one. They were never trusted; now they are gone."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _write(final: Path, kind, key, vocab_size, batches) -> None:
    """Tokenize into a temporary sibling, then rename it in whole."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_entry(tmp, kind, key, vocab_size, batches)
        os.rename(tmp, final)  # the entry appears whole or not at all
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_entry(tmp: Path, kind, key, vocab_size, batches) -> None:
    """Write the batches ``(tokens, doc lengths, doc bytes[, mask])`` in order, a batch
    at a time (memory: one batch), then meta.json last: an entry without it is broken."""
    dtype = token_dtype(vocab_size)
    n_tokens = n_docs = 0
    with (
        open(tmp / "tokens.bin", "wb") as f_tok,
        open(tmp / "mask.bin", "wb") if kind == "sft" else _Null() as f_mask,
        open(tmp / "doc_offsets.bin", "wb") as f_off,
        open(tmp / "doc_bytes.bin", "wb") as f_bytes,
    ):
        np.zeros(1, np.int64).tofile(f_off)
        out = batches(dtype)
        while True:
            try:
                batch = next(out)
            except StopIteration as done:
                extra = done.value or {}
                break
            tokens, lengths, nbytes = batch[:3]
            if tokens.size and int(tokens.max()) >= vocab_size:  # unsigned: never < 0
                raise TokenCacheError(f"batch at document {n_docs}: id outside the vocabulary")
            tokens.astype(dtype, copy=False).tofile(f_tok)
            if len(batch) > 3:
                batch[3].astype(np.uint8, copy=False).tofile(f_mask)
            (n_tokens + np.cumsum(lengths)).astype(np.int64).tofile(f_off)
            nbytes.astype(np.int64, copy=False).tofile(f_bytes)
            n_tokens += int(lengths.sum())
            n_docs += len(lengths)
        for f in (f_tok, f_mask, f_off, f_bytes):
            if not isinstance(f, _Null):
                f.flush()
                os.fsync(f.fileno())
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "key": key,
        "vocab_size": int(vocab_size),
        "token_dtype": dtype.name,
        "n_tokens": int(n_tokens),
        "n_docs": int(n_docs),
        **extra,
    }
    atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))


class _Null:
    """A do-nothing file for the pretraining case (no mask file)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
