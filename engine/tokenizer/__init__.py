"""The byte-level BPE tokenizer: training merges, encoding, chat templates, special tokens."""

from .bpe_tokenizer import BpeTokenizer
from .tokenizer_config import SPECIAL_TOKENS, BpeTokenizerConfig, TokenizerError

__all__ = ["BpeTokenizer", "BpeTokenizerConfig", "SPECIAL_TOKENS", "TokenizerError"]
