"""What a server request asks of its row beyond sampling: log-probabilities, and (for an
echoed completion) the prompt's own log-probabilities. Kept apart from
:class:`~.sampling.SamplingConfig`, which is also llm-chat's and generate's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RowOptions"]


@dataclass(frozen=True)
class RowOptions:
    """``logprobs``: None (off) or how many alternatives to report per generated token
    (0 = only the chosen one); ``prompt_logprobs``: also score every prompt token (echo);
    ``grammar``: a compiled grammar whose token mask constrains sampling (None = free)."""

    logprobs: int | None = None
    prompt_logprobs: bool = False
    grammar: Any = None

    @property
    def top(self) -> int:
        return self.logprobs or 0
