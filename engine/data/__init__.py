"""Training data: text and chat files read and checked, large corpora streamed, the token cache."""

from .data_files import DataError
from .records import load_chats, load_texts
from .token_cache import TokenCache

__all__ = ["DataError", "TokenCache", "load_chats", "load_texts"]
