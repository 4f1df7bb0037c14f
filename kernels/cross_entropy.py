"""Softmax cross-entropy over the vocabulary, and fused linear + cross-entropy.

Loss is the mean over targets that are not `ignore_index`; when every target is ignored
the loss is 0 and all gradients are 0 (torch's own function would return NaN).
"""

from __future__ import annotations

import torch


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The one torch reference: logits [N, V], targets [N] -> scalar mean loss."""
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    losses = torch.nn.functional.cross_entropy(
        logits.to(compute), targets, ignore_index=ignore_index, reduction="none"
    )
    count = (targets != ignore_index).sum().clamp_min(1)
    return losses.sum() / count


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Reference for the fused op: mean loss of hidden [N, d] @ weight[V, d].T."""
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index)
