"""What a training run runs with: its autocast dtype, its optimizer, and how an
out-of-memory failure is recognised. Shared by the loop (loop.py) and the planner (plan.py).
"""

from __future__ import annotations

import torch

from .train_config import TrainConfig

__all__ = ["autocast_dtype", "build_optimizer", "is_oom"]


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D) only. Fused (CPU and CUDA): one kernel
    per update, and its step count lives on the parameters' device (no host sync)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)


def is_oom(e: BaseException) -> bool:
    """An allocation failure (CUDA, the CPU allocator, numpy)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "allocate" in str(e)
