"""The tokenizer half of a GGUF file: what llama.cpp needs to tokenize exactly as we do.

llama.cpp's ``gpt2`` tokenizer model is a byte-level BPE like ours. It reads:

- ``tokenizer.ggml.tokens``: every id's token as a byte-level string (see
  :mod:`.byte_level`; ``b" the"`` is ``"Ġthe"``), special tokens as their text;
- ``tokenizer.ggml.token_type``: NORMAL for byte and merge tokens, CONTROL for our special
  tokens (llama.cpp then parses their text only when asked to, as our ``encode`` does);
- ``tokenizer.ggml.merges``: ``"left right"`` per listed pair, in rank order (llama.cpp's
  rank of a pair is its position; see :func:`merge_strings`);
- ``tokenizer.ggml.pre = "llama-bpe"``: llama.cpp's pre-tokenizer whose regex is our
  GPT-4 pattern (written there with ``'[sS]`` for ``(?i:'s)``) and which, like our encoder,
  takes a whole pre-token that is itself a token without merging (``ignore_merges``);
- the bos / eos / padding / end-of-turn (``<|end|>``) ids the tokenizer has, and
  ``add_bos_token`` when it has a bos (our prompts and documents start with it), never
  ``add_eos_token``;
- ``tokenizer.chat_template``: the chat template as Jinja (:mod:`.chat_template`); llama.cpp
  drops the template's leading bos when it adds one itself.

llama.cpp does not normalize text: ``"none"`` tokenizes identically, ``"nfc"`` identically
on NFC text (nearly all text; decomposed accents differ). Refused with
:class:`GGUFExportError`, since llama.cpp would tokenize differently: the ``ascii``
normalization, a custom pre-tokenizer pattern, and a special token whose text is also
another token's string (llama.cpp keys its vocabulary by text).
"""

from __future__ import annotations

from ..errors import EngineError
from ..tokenizer.tokenizer_config import GPT4_PATTERN
from .byte_level import token_to_str

__all__ = ["PRE_TOKENIZER", "GGUFExportError", "add_vocab", "check_vocab"]

PRE_TOKENIZER = "llama-bpe"


class GGUFExportError(EngineError, ValueError):
    """A model or tokenizer that llama.cpp could not run as we do (one-line message)."""


def token_strings(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token strings, GGUF token types) for ids 0..vocab_size-1.

    Ids past the tokenizer's own (a model built with a larger vocabulary) are UNUSED
    placeholders ``<|unused_{id}|>``.
    """
    import gguf

    specials = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size:
            tokens.append(f"<|unused_{i}|>")
            types.append(gguf.TokenType.UNUSED)
        elif i in specials:
            tokens.append(tokenizer.token_bytes(i).decode("utf-8"))
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(token_to_str(tokenizer.token_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def merge_strings(tokenizer) -> list[str]:
    """``"left right"`` per merge, in rank order, in the byte-level alphabet.

    llama.cpp, like Hugging Face's BPE, merges only listed pairs, by list position; under
    our tiktoken rule a token may also form from another split (``"abc"`` from ``a + bc``
    as well as ``ab + c``), so those splits are listed too, at their token's rank. The
    list is the Hugging Face export's, one space between the halves (byte-level strings
    never contain a plain space: it is ``"Ġ"``).
    """
    from .hf_tokenizer import hf_merges

    return [f"{a} {b}" for a, b in hf_merges(tokenizer)]


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Refuse tokenizers llama.cpp would not reproduce (see the module docstring)."""
    cfg = tokenizer.config
    if cfg.normalization not in ("nfc", "none"):
        raise GGUFExportError(
            f"tokenizer normalization {cfg.normalization!r} cannot be exported to GGUF: "
            "llama.cpp does not normalize text, so it would tokenize differently"
        )
    if cfg.pattern != GPT4_PATTERN:
        raise GGUFExportError(
            "the tokenizer has a custom pre-tokenizer pattern; GGUF can only name one of "
            "llama.cpp's built-in pre-tokenizers, and only the default (GPT-4) pattern "
            f"matches one ({PRE_TOKENIZER!r})"
        )
    if tokenizer.vocab_size > vocab_size:
        raise GGUFExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size} embeddings"
        )
    tokens, _ = token_strings(tokenizer, vocab_size)
    seen: dict[str, int] = {}
    for i, s in enumerate(tokens):
        if s in seen:
            raise GGUFExportError(
                f"tokens {seen[s]} and {i} are both {s!r} in GGUF's text form; llama.cpp "
                "looks tokens up by text, so rename the special token"
            )
        seen[s] = i


def add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """Write the ``tokenizer.*`` keys (call :func:`check_vocab` first)."""
    from ..tokenizer.chat_template import jinja_template

    tokens, types = token_strings(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merge_strings(tokenizer))
    ids = {  # an imported tokenizer may lack a role (SmolLM has no pad token)
        writer.add_bos_token_id: tokenizer.bos_id,
        writer.add_eos_token_id: tokenizer.eos_id,
        writer.add_pad_token_id: tokenizer.pad_id,
        writer.add_eot_token_id: tokenizer.end_id,
    }
    for add, i in ids.items():
        if i is not None:
            add(i)
    writer.add_add_bos_token(tokenizer.bos_id is not None)
    writer.add_add_eos_token(False)
    template = jinja_template(tokenizer)
    if template is not None:  # None: a raw-text-only tokenizer
        writer.add_chat_template(template)
