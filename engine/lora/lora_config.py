"""The LoRA hyper-parameters, declared once like the other configs (engine.fields).

    LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("qkv", "proj", "gate_up", "down"))

Each adapted linear layer W (out x in) gains A (rank x in) and B (out x rank); the layer
computes W x + (alpha / rank) * B A dropout(x). ``base_dtype`` is the dtype the frozen
weights of the adapted layers are held in while training ("bfloat16" halves them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EngineError
from ..fields import ConfigMixin, at_least, number, one_of, option

TARGETS = ("qkv", "proj", "gate_up", "down")  # the linear layers of a block, by module name
BASE_DTYPES = ("float32", "bfloat16")


class LoraConfigError(EngineError, ValueError):
    """A LoRA setting out of range (the message names the field)."""


def _targets(name: str, v) -> None:
    if not isinstance(v, tuple) or not v or not all(isinstance(t, str) for t in v):
        raise ValueError(f"{name} must be a non-empty list of {', '.join(TARGETS)}")
    unknown = [t for t in v if t not in TARGETS]
    if unknown:
        raise ValueError(f"{name}: unknown layer(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(TARGETS)}")  # fmt: skip
    if len(set(v)) != len(v):
        raise ValueError(f"{name} lists a layer twice: {', '.join(v)}")


@dataclass
class LoraConfig(ConfigMixin):
    """Which layers get adapters, their rank, scale and dropout; validated, JSON-able."""

    error = LoraConfigError
    what = "LoRA config"

    rank: int = option(8, at_least(1, maximum=65536))
    alpha: float = option(16.0, number(lo=0, lo_open=True))
    dropout: float = option(0.0, number(lo=0, hi=1, hi_open=True))
    targets: tuple[str, ...] = option(TARGETS, _targets)
    base_dtype: str = option("float32", one_of(BASE_DTYPES))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """'qkv, down' -> ('qkv', 'down') (checked by LoraConfig)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
