"""The trainer's resumable state (``trainer_state.json``): RNG encoding and its schema.

Everything a resume reads is checked here first, field by field, so a tampered or
damaged file is one clear error naming the field, never a traceback deep in the loop.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import torch

from .train_config import PHASES, TrainConfig, TrainingError

TRAINER_STATE_VERSION = 1


def encode_rng(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_rng(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    state = {"torch": encode_rng(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [encode_rng(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(decode_rng(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_rng(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------- schema


def _int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def rng_ok(r: Any) -> bool:
    """A torch RNG state of the right size (and CUDA states, if any, that decode)."""
    if not isinstance(r, dict) or not isinstance(r.get("torch"), str):
        return False
    try:
        if decode_rng(r["torch"]).numel() != torch.get_rng_state().numel():
            return False
        cuda = r.get("cuda", [])
        return isinstance(cuda, list) and all(isinstance(c, str) and decode_rng(c).numel()
                                              for c in cuda)  # fmt: skip
    except (binascii.Error, ValueError):
        return False


CHECKS = {  # field -> (what it must be, check)
    "version": (f"{TRAINER_STATE_VERSION}", lambda v: v == TRAINER_STATE_VERSION and _int(v)),
    "phase": (" or ".join(PHASES), lambda v: v in PHASES),
    "step": ("an integer >= 0", _int),
    "total_steps": ("an integer >= 1", lambda v: _int(v, 1)),
    "examples_seen": ("an integer >= 0", _int),
    "tokens_seen": ("an integer >= 0", _int),
    "best_val_loss": ("a finite number or null", lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))),
    "bad_evals": ("an integer >= 0", _int),
    "world_size": ("an integer >= 1", lambda v: _int(v, 1)),
    "data_key": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "rng": ("a saved random-number-generator state", rng_ok),
    "train_config": ("an object", lambda v: isinstance(v, dict)),
    "extra": ("an object", lambda v: isinstance(v, dict)),
}  # fmt: skip


def check_trainer_state(st: Any, where: str) -> dict:
    """Raise TrainingError naming the first missing or bad field; return ``st``."""
    if not isinstance(st, dict) or not st:
        raise TrainingError(f"{where}: not a resumable checkpoint (no trainer state)")
    for name, (what, ok) in CHECKS.items():
        if name not in st:
            raise TrainingError(f"{where}: trainer state is missing {name!r}")
        if not ok(st[name]):
            raise TrainingError(f"{where}: trainer state {name!r} must be {what}, "
                                f"got {str(st[name])[:60]!r}")  # fmt: skip
    if st["step"] > st["total_steps"]:
        raise TrainingError(f"{where}: trainer state step {st['step']} > total_steps")
    ranks = st.get("rng_ranks")
    if ranks is not None and not (isinstance(ranks, list) and len(ranks) == st["world_size"]
                                  and all(map(rng_ok, ranks))):  # fmt: skip
        raise TrainingError(f"{where}: trainer state 'rng_ranks' must hold one RNG state per rank")
    try:
        cfg = TrainConfig.from_dict(st["train_config"])
    except (ValueError, TypeError) as e:
        raise TrainingError(f"{where}: trainer state 'train_config': {e}") from None
    if cfg.phase != st["phase"]:
        raise TrainingError(f"{where}: trainer state 'train_config' is for another phase")
    return st
