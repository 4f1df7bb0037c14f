"""What one ahead-of-time kernel build is: :class:`AotSpec`.

A leaf module: it imports nothing from the kernel modules, so each kernel module imports
it at the top to describe its own builds (``aot_specs``), and :mod:`.aot`, which imports
the kernel modules to compile those builds, imports it too. No import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    """One kernel build: the @triton.jit function, every argument's type in order
    (constexpr arguments typed "constexpr"), the constexpr values, and launch options."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
