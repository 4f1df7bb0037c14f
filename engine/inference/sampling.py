"""Sampling settings and the logit processors that turn next-token logits into a token.

One decoding step, for logits ``[B, V]`` (float32) and the ids seen so far:

    1. repetition penalty   (CTRL-style, on every token seen in prompt + answer)
    2. frequency / presence (OpenAI-style, on tokens of the answer only)
    3. temperature 0        -> argmax of the penalized logits (greedy), done
    4. divide by temperature
    5. top-k, then top-p, then min-p (each masks logits to -inf)
    6. draw from softmax with a seeded ``torch.Generator``

Every filter keeps at least the most likely token, so a row never becomes all -inf.

    >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    >>> top_k_filter(logits, 2)
    tensor([[2., 1., -inf, -inf]])
    >>> apply_repetition_penalty(logits, torch.tensor([[1, 0, 0, 1]]), 2.0)
    tensor([[ 1.0000,  1.0000,  0.5000, -2.0000]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EngineError
from ..fields import MAX_SEED, ConfigMixin, at_least, number, option


class SamplingError(EngineError, ValueError):
    """A sampling setting out of range (the message names the setting and the valid range)."""


def _stop_strings(name: str, v: Any) -> None:
    if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"{name} must be a list of strings, got {v!r}")
    if any(s == "" for s in v):
        raise ValueError(f"{name} strings must not be empty")


# The sampler works in float32: logits are divided by temperature and repetition_penalty
# and penalties are multiplied by counts, so values beyond these overflow to inf and nan.
SMALL, BIG = 1e-6, 1e6


@dataclass
class SamplingConfig(ConfigMixin):
    """How to pick each next token and when to stop.

    temperature         >= 0; 0 means greedy (argmax after the penalties).
    top_k               >= 0; keep the k most likely tokens; 0 means off.
    top_p               in (0, 1]; keep the smallest set whose probability reaches top_p.
    min_p               in [0, 1); drop tokens with p < min_p * p(most likely); 0 means off.
    repetition_penalty  > 0; 1 means off. Logits of tokens already seen (prompt or answer)
                        are divided by it when positive, multiplied when negative.
    frequency_penalty   finite; subtracts penalty * count(token in the answer) from the logit.
    presence_penalty    finite; subtracts penalty once for every token already in the answer.
    max_new_tokens      >= 1; generation stops after this many new tokens.
    seed                None (fresh randomness) or an int >= 0: same seed, same tokens.
    stop                stop strings; generation ends when one appears, and the text
                        returned never contains it (nor anything after it). A single
                        string is taken as a list of one.
    """

    error = SamplingError
    what = "sampling config"

    temperature: float = option(0.8, number(lo=0, hi=BIG), "0 = greedy", metavar="T")
    top_k: int = option(0, at_least(0), "keep the k most likely tokens, 0 = off", metavar="K")
    top_p: float = option(  # 1 (off): the server's default too (OpenAI's), one default
        1.0, number(lo=0, lo_open=True, hi=1), "nucleus sampling, in (0, 1]", metavar="P"
    )
    min_p: float = option(
        0.0, number(lo=0, hi=1, hi_open=True), "drop p < min_p * p(best), in [0, 1)", metavar="P"
    )
    repetition_penalty: float = option(
        1.0, number(lo=SMALL, hi=BIG), f">= {SMALL:g}, 1 = off", metavar="X"
    )
    frequency_penalty: float = option(
        0.0, number(lo=-BIG, hi=BIG), "per repeat in the answer", metavar="X"
    )
    presence_penalty: float = option(
        0.0, number(lo=-BIG, hi=BIG), "once per token in the answer", metavar="X"
    )
    max_new_tokens: int = option(256, at_least(1), "longest answer in tokens", metavar="N")
    seed: int | None = option(
        None,
        at_least(0, optional=True, maximum=MAX_SEED),
        "seed for reproducible sampling (default: random)",
        metavar="N",
    )
    stop: tuple[str, ...] = option((), _stop_strings, "stop strings", flag=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        super().__post_init__()

    def check_together(self) -> None:
        if 0 < self.temperature < SMALL:  # dividing float32 logits by it overflows
            raise ValueError(f"temperature must be 0 or >= {SMALL:g}, got {self.temperature:g}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Names accepted by parse_setting (llm-chat's /set), with their parsers.
def _parse_seed(text: str) -> int | None:
    return None if text.lower() in ("none", "off", "random") else int(text)


SETTING_PARSERS: dict[str, Any] = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "frequency_penalty": float,
    "presence_penalty": float,
    "max_new_tokens": int,
    "seed": _parse_seed,
}


def parse_setting(config: SamplingConfig, key: str, value: str) -> SamplingConfig:
    """Return a copy of ``config`` with one setting parsed from text (``/set top_k 40``).

    Dashes and underscores are interchangeable in ``key``. ``stop`` takes a string and
    appends it; ``stop none`` clears the list. Raises :class:`SamplingError`.
    """
    name = key.strip().lower().replace("-", "_")
    if name == "stop":
        if value.lower() in ("none", "off", ""):
            return config.replace(stop=())
        return config.replace(stop=tuple(config.stop) + (value,))
    if name not in SETTING_PARSERS:
        known = ", ".join([*SETTING_PARSERS, "stop"])
        raise SamplingError(f"unknown setting {key!r}; choose one of {known}")
    try:
        parsed = SETTING_PARSERS[name](value.strip())
    except ValueError:
        raise SamplingError(f"{name}: cannot parse {value!r} as a number") from None
    return config.replace(**{name: parsed})


# ---------------------------------------------------------------------------------------
# Logit processors. All take logits [B, V] and return a new tensor (inputs are not changed).


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalize tokens with ``seen[b, v] > 0``: positive logits / penalty, negative * penalty.

    ``[[2, 1, .5, -1]]`` with tokens 0 and 3 seen and penalty 2 -> ``[[1, 1, .5, -2]]``.
    """
    if penalty == 1.0:
        return logits
    mask = seen > 0
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(mask, penalized, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """``logit - frequency * count - presence * (count > 0)`` for every token.

    counts [B, V]: how often each token occurs in the answer so far.
    """
    if frequency == 0.0 and presence == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits per row (ties broken by index); others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches ``p``.

    Probabilities [.5, .3, .15, .05] with p = .8 keep the first two (.5 + .3 = .8);
    with p = .81 they keep three. The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ahead
    # A token is needed while the mass ahead of it is still short of p. A tiny tolerance
    # makes exact sums like .5 + .3 = .8 count as reaching p despite float rounding.
    drop_sorted = before >= p - 1e-6
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    config: SamplingConfig,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply penalties, temperature and filters (steps 1, 2, 4, 5 above) in float32.

    seen [B, V]: > 0 where the token occurs in prompt or answer (repetition penalty);
    counts [B, V]: occurrences in the answer (frequency / presence penalties).
    With temperature 0 only the penalties are applied.
    """
    out = logits.float()
    if seen is not None:
        out = apply_repetition_penalty(out, seen, config.repetition_penalty)
    if counts is not None:
        out = apply_frequency_presence(
            out, counts, config.frequency_penalty, config.presence_penalty
        )
    if config.greedy:
        return out
    if config.temperature != 1.0:
        out = out / config.temperature
    out = top_k_filter(out, config.top_k)
    out = top_p_filter(out, config.top_p)
    out = min_p_filter(out, config.min_p)
    return out


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device``; seeded when ``seed`` is given, else from the OS."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_next(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token of every row: logits [B, V] -> ids [B] (int64)."""
    processed = process_logits(logits, config, seen, counts)
    if config.greedy:
        return processed.argmax(dim=-1)
    probs = torch.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
