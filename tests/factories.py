"""Tiny tokenizers, tiny models and the in-process CLI runner that the tests share.

One place for them, so a test module states only what differs (its texts, its shape):

    tok = tiny_tokenizer(TEXTS, vocab_size=290)
    model = tiny_model(tok, seed=1, n_layers=3)
    rc, out, err = run_cli(chat.main, capsys, ckpt, "--prompt", "hi")

Public names only: everything here goes through the engine's public API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

TEXTS = ["the cat sat on the mat. " * 4, "checkpoints are written atomically, then renamed."]

# The default tiny shape: small enough for the CPU, big enough to have every kind of weight.
TINY_SHAPE = dict(d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=16)


def tiny_tokenizer(texts: Sequence[str] = TEXTS, vocab_size: int = 290, **config) -> BpeTokenizer:
    """A byte-level BPE trained on `texts` (deterministic: same texts, same merges)."""
    return BpeTokenizer.train(list(texts), BpeTokenizerConfig(vocab_size=vocab_size, **config))


def tiny_model(
    vocab: int | BpeTokenizer,
    shape: Mapping[str, object] = TINY_SHAPE,
    *,
    seed: int = 0,
    backend: str = "auto",
    **overrides,
) -> Transformer:
    """A freshly initialised model in eval mode, of `shape` with `overrides` applied.

    `vocab` is a vocabulary size or a tokenizer (its size is used; a `vocab_size` in
    `overrides` wins, for a model that must not match its tokenizer). `seed` seeds torch's
    global generator before initialisation, so equal seeds give equal weights.
    """
    size = vocab if isinstance(vocab, int) else vocab.vocab_size
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**shape, "vocab_size": size, **overrides})
    return Transformer(cfg, backend=backend).eval()


def run_cli(main: Callable[[list[str]], int], capsys, *argv) -> tuple[int, str, str]:
    """Call a console script's `main` in-process: (exit code, stdout, stderr).

    Arguments may be paths or numbers; they are passed as strings, as a shell would.
    """
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
