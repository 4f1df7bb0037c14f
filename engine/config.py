"""Model configuration: one validated dataclass, JSON-serializable, plus named presets.

``vocab_size`` always comes from the tokenizer, so presets take it as an argument:

    >>> cfg = ModelConfig.preset("seed", vocab_size=512)
    >>> (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq_len)
    (128, 3, 4, 256, 80)
    >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot be built (the message names the field)."""


@dataclass
class ModelConfig:
    """Shape and hyper-parameters of the decoder-only Transformer in :mod:`engine.model`.

    d_ff is the hidden width of the SwiGLU feed-forward (three d_model x d_ff matrices).
    init_std is the std of the normal init; residual output projections use
    init_std / sqrt(2 * n_layers).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    max_seq_len: int = 80
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"head dimension d_model/n_heads = {self.head_dim} must be even for RoPE"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("dropout", "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. parsed JSON); unknown or missing keys raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        if "vocab_size" not in data:
            raise ConfigError("model config is missing vocab_size")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A named preset (see PRESETS) with the tokenizer's vocab size and any overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "vocab_size": vocab_size, **overrides})

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count by formula (equals ``Transformer(cfg).num_parameters()``).

        Per block: 4*d^2 (q, k, v, o) + 3*d*d_ff (SwiGLU) + 2*d (two RMSNorm weights);
        then the final RMSNorm d, the embedding V*d and, when untied, the output head V*d.
        ``exclude_embeddings`` drops the token embedding (and the untied head).
        """
        d = self.d_model
        per_block = 4 * d * d + 3 * d * self.d_ff + 2 * d
        n = self.n_layers * per_block + d
        if not exclude_embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n


# Presets. Parameter counts (tied embeddings):
#   seed  at vocab 512:   ~0.56M   (d 128, 3 blocks, 4 heads, d_ff 256, seq 80)
#   small at vocab 8192:  ~8.9M, at 12288: ~10.0M, at 16384: ~11.0M
#   gpt2  at vocab 50257: ~123.6M  (d_ff 2048 = 8/3 * 768 makes SwiGLU match GPT-2's MLP)
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(d_model=128, n_layers=3, n_heads=4, d_ff=256, max_seq_len=80),
    "small": dict(d_model=256, n_layers=8, n_heads=4, d_ff=768, max_seq_len=256),
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=1024),
}
