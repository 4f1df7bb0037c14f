"""Encode a stream of documents on several processes, in order, in bounded memory.

    documents --(main: cut into batches of ~1 MB, in order)--> workers encode a batch each
              --(main: results taken back in submission order)--> the token cache writer

The output depends only on the documents and the tokenizer, never on the number of
workers: batches are cut in a fixed way, each is encoded whole by one worker, and results
are consumed in the order the batches were made. At most ``2 x workers`` batches are in
flight, so memory does not grow with the corpus.

The engine is our encoder (the reference) or, when it is installed and agrees with ours
on a probe text, ``tiktoken`` running our merges and pattern (its merge rule is ours:
lowest rank first, leftmost on ties); ``auto`` picks tiktoken when it can. Workers are
started with ``spawn`` (a fork after torch is imported can deadlock) and ignore SIGINT:
Ctrl-C reaches the main process, which stops them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ..errors import EngineError
from ..worker_pool import batches, run_pool, worth_a_pool
from .bpe_tokenizer import BpeTokenizer
from .tokenizer_config import GPT4_PATTERN

ENGINES = ("auto", "tiktoken", "tritonlm")
_PROBE = "Hello, wörld! It's 2024:\n\tcode = f(x) + 12345;  # ünïcode 中文 🙂\r\n  end  "


class EncodeError(EngineError, ValueError):
    """An encoding engine that cannot be used (the message says why)."""


# ----------------------------------------------------------------------------- engines


def make_encoder(tokenizer, engine: str = "auto") -> tuple[str, Callable[[str], list[int]]]:
    """(engine name, encode(text) -> ids without bos/eos) for ``engine``."""
    if engine not in ENGINES:
        raise EncodeError(f"unknown encoding engine {engine!r} (expected one of {ENGINES})")
    if engine != "tritonlm":
        fast, why = _tiktoken_encoder(tokenizer)
        if fast is not None:
            return "tiktoken", fast
        if engine == "tiktoken":
            raise EncodeError(f"the tiktoken engine cannot run this tokenizer: {why}")
    return "tritonlm", tokenizer.encode


def _tiktoken_encoder(tokenizer):
    """tiktoken running our merges, or (None, why not)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    if tokenizer.config.pattern != GPT4_PATTERN:
        return None, "only the default pre-tokenizer pattern is supported"  # regex dialects
    if getattr(tokenizer.config, "merge_rule", "ranks") != "ranks":
        return None, "tiktoken merges by rank only (this tokenizer lists its merges)"
    enc = tiktoken.Encoding(
        name="tritonlm",
        pat_str=tokenizer.config.pattern,
        mergeable_ranks=tokenizer.mergeable_ranks(),
        special_tokens={},
    )
    # encode_ordinary, not encode_to_numpy: measured 14.4 vs 8.9 MB/s (bench_data.py)
    normalize, encode_ordinary = tokenizer.normalize, enc.encode_ordinary

    def encode(text: str) -> list[int]:
        return encode_ordinary(normalize(text))

    if encode(_PROBE) != tokenizer.encode(_PROBE):  # never trust a second engine blindly
        return None, "its ids differ from ours on a probe text"
    return encode, ""


def document_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The ids `encode_document` puts before and after a text: ``([bos], [eos])``, or
    fewer for an imported tokenizer without those roles."""
    core, doc = tokenizer.encode("a"), tokenizer.encode_document("a")
    for h in range(len(doc) - len(core) + 1):
        if doc[h : h + len(core)] == core:
            return doc[:h], doc[h + len(core) :]
    raise EncodeError("encode_document does not wrap encode")  # pragma: no cover


def encode_batch(texts: list[str], encode, bos, eos, dtype) -> tuple:
    """(tokens, doc lengths, doc UTF-8 bytes) of ``bos + text + eos`` for each text
    (``bos``/``eos``: the id lists from `document_ends`, or single ids)."""
    first, last = np.array(bos, dtype).reshape(-1), np.array(eos, dtype).reshape(-1)
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    nbytes = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = np.array(encode(text), dtype)  # ids < vocab_size: they fit in dtype
        parts += (first, ids, last)
        lengths[i] = ids.size + first.size + last.size
        nbytes[i] = len(text.encode("utf-8"))
    return np.concatenate(parts) if parts else np.zeros(0, dtype), lengths, nbytes


# ----------------------------------------------------------------------------- the pool

# One per worker process: the encoder built once by `_init` (a pool worker keeps no
# other state).
_WORKER: dict = {}


def _init(tokenizer_dict: dict, engine: str, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    tok = BpeTokenizer.from_dict(tokenizer_dict)
    _, encode = make_encoder(tok, engine)
    bos, eos = document_ends(tok)
    _WORKER.update(encode=encode, bos=bos, eos=eos, dtype=np.dtype(dtype))


def _work(texts: list[str]) -> tuple:
    w = _WORKER
    return encode_batch(texts, w["encode"], w["bos"], w["eos"], w["dtype"])


def encode_documents(
    docs: Iterable[str],
    tokenizer,
    dtype,
    workers: int = 1,
    engine: str = "auto",
    batch_chars: int | None = None,
) -> tuple[str, Iterator[tuple]]:
    """(engine name, iterator of encoded batches in document order); see module docstring.

    The engine is chosen here, once, in the main process; every worker runs the same one.
    """
    name, encode = make_encoder(tokenizer, engine)
    workers, cut = worth_a_pool(batches(docs, batch_chars), workers)
    if workers <= 1:
        bos, eos = document_ends(tokenizer)
        return name, (encode_batch(b, encode, bos, eos, dtype) for b in cut)
    init = (tokenizer.to_dict(), name, np.dtype(dtype).name)
    return name, run_pool(_work, _init, init, cut, workers)
