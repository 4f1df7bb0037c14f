"""The decoder-only Transformer, its config and presets, its KV cache, its memory estimate."""

from .config import PRESETS, ConfigError, ModelConfig
from .transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "Transformer"]
