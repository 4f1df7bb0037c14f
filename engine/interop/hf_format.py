"""What the Hugging Face readers and writers share: the one error they raise, the key our
training fields travel under, and the imported-tokenizer record. A leaf, so that export
(hf_tokenizer.py) and import (hf_tokenizer_import.py) need not import each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EngineError
from ..tokenizer.bpe_tokenizer import BpeTokenizer

__all__ = ["TRAINING_KEY", "HFFormatError", "ImportedTokenizer"]


#: tokenizer_config.json key holding our config's training-only fields (transformers keeps
#: unknown keys as they are)
TRAINING_KEY = "tritonlm_training"


class HFFormatError(EngineError, ValueError):
    """A Hugging Face file we cannot represent exactly. The message names the field."""


@dataclass
class ImportedTokenizer:
    """A Hugging Face tokenizer in our layout. ``hf_ids[i]`` is the Hugging Face id of our
    id ``i`` (embedding rows: ``ours[i] = theirs[hf_ids[i]]``), or -1 for a byte their
    vocabulary lacks (its row has no source); ``notes`` say what did not come along (a
    chat template we cannot render, ...)."""

    tokenizer: BpeTokenizer
    hf_ids: list[int]
    notes: list[str] = field(default_factory=list)
