"""Model configuration: one validated dataclass, JSON-serializable, plus named presets.

``vocab_size`` always comes from the tokenizer, so presets take it as an argument:

    >>> cfg = ModelConfig.preset("seed", vocab_size=512)
    >>> (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq_len)
    (128, 3, 4, 256, 80)
    >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import EngineError
from ..fields import ConfigMixin, at_least, boolean, number, option


class ConfigError(EngineError, ValueError):
    """A model configuration that cannot be built (the message names the field)."""


@dataclass
class ModelConfig(ConfigMixin):
    """Shape and hyper-parameters of the decoder-only Transformer in :mod:`engine.model`.

    d_ff is the hidden width of the SwiGLU feed-forward (three d_model x d_ff matrices).
    init_std is the std of the normal init; residual output projections use
    init_std / sqrt(2 * n_layers).
    """

    error = ConfigError
    what = "model config"

    vocab_size: int = option(None, at_least(1), flag=False)
    d_model: int = option(128, at_least(1), "model width (default: the preset's)", metavar="N")
    n_layers: int = option(3, at_least(1), "Transformer blocks (default: the preset's)",
                           metavar="N")  # fmt: skip
    n_heads: int = option(4, at_least(1), "attention heads (default: the preset's)", metavar="N")
    # Key/value heads of grouped-query attention; None (the default) means n_heads and is
    # resolved when the config is built, so a config.json written before the field existed
    # builds the same model it always did.
    n_kv_heads: int | None = option(
        None,
        at_least(1, optional=True),
        "key/value heads, dividing the attention heads (default: as many as heads)",
        metavar="N",
    )
    d_ff: int = option(256, at_least(1), "feed-forward width (default: the preset's)",
                       metavar="N")  # fmt: skip
    max_seq_len: int = option(80, at_least(1), flag=False)  # the CLI's --seq-len sets it
    dropout: float = option(
        0.0,
        number(lo=0, hi=1, hi_open=True),
        "dropout probability (default: the preset's, 0)",
        metavar="P",
    )
    tie_embeddings: bool = option(True, boolean, flag=False)
    rope_theta: float = option(10000.0, number(lo=0, lo_open=True), flag=False)
    norm_eps: float = option(1e-6, number(lo=0, lo_open=True), flag=False)
    init_std: float = option(0.02, number(lo=0, lo_open=True), flag=False)

    # Fields added after configs were first saved: a config.json without them still loads,
    # with the default (which builds exactly the model it described).
    added_later = ("n_kv_heads",)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:  # the default: one key/value head per query head
            self.n_kv_heads = self.n_heads
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def check_together(self) -> None:
        if isinstance(self.n_kv_heads, int) and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"`n_heads` ({self.n_heads}) must be a multiple of `n_kv_heads` ({self.n_kv_heads})"
            )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"`d_model` ({self.d_model}) must be divisible by `n_heads` ({self.n_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"head dimension `d_model`/`n_heads` = {self.head_dim} must be even for RoPE"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. parsed JSON); unknown or missing keys raise ConfigError."""
        if isinstance(data, dict) and "vocab_size" not in data:
            raise ConfigError("model config is missing vocab_size")
        return super().from_dict(data)

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A named preset (see PRESETS) with the tokenizer's vocab size and any overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "vocab_size": vocab_size, **overrides})

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count by formula (equals ``Transformer(cfg).num_parameters()``).

        Per block: 2*d^2 (q, o) + 2*d*kv_dim (k, v; 2*d^2 without grouped-query attention)
        + 3*d*d_ff (SwiGLU) + 2*d (two RMSNorm weights); then the final RMSNorm d, the
        embedding V*d and, when untied, the output head V*d. ``exclude_embeddings`` drops
        the token embedding (and the untied head).
        """
        d = self.d_model
        per_block = 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.d_ff + 2 * d
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
