"""How much memory a model or a step needs, and how much this machine has: refuse what
cannot fit with one clear line instead of stalling in swap or being OOM-killed."""

from __future__ import annotations

import torch

from .config import ModelConfig


def available_memory(device: torch.device) -> int | None:
    """Bytes a run can still allocate on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_bytes(cfg: ModelConfig) -> int:
    """Building the model: float32 weights (and as much again while initializing), plus
    the RoPE tables over max_seq_len positions and their temporaries."""
    return cfg.num_parameters() * 4 * 2 + cfg.max_seq_len * cfg.head_dim * 4 * 8


def step_bytes(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """A rough lower bound of one training step (float32): weights, gradients and two AdamW
    moments, per-token activations of every block and one chunk of logits. Meant to refuse
    runs that cannot fit, not to predict the peak."""
    tokens = batch_size * seq_len
    per_token = cfg.n_layers * (10 * cfg.d_model + 3 * cfg.d_ff) * 4  # saved activations
    logits = min(tokens, 8192) * cfg.vocab_size * 4 * 2  # a chunk of logits and its grad
    return 16 * cfg.num_parameters() + tokens * per_token + logits


def too_big(need: int, device: torch.device) -> str | None:
    """None when ``need`` bytes fit on ``device``; else the reason, for an error message."""
    have = available_memory(device)
    if have is None or need <= have:
        return None
    return f"needs {need / 2**30:.1f} GiB, {device.type} has {have / 2**30:.1f} GiB available"
