"""The only entry point the engine uses for attention, RMSNorm and the loss.

Choosing the backend is all it does: the Triton functions it calls validate their inputs
(once, with a ValueError naming the problem) and run the kernels as ``tritonlm::`` custom
ops, so each of these functions traces into a torch.compile graph without a graph break.

Backends: ``auto`` picks the Triton kernels for CUDA tensors (when triton is installed)
and the torch reference otherwise; ``triton`` forces the kernels (CPU tensors need
``TRITON_INTERPRET=1`` set before triton is imported); ``torch`` forces the references.
"""

from __future__ import annotations

import os

import torch

from . import attention as _attention
from . import cross_entropy as _cross_entropy
from . import rmsnorm as _rmsnorm
from ._triton import HAS_TRITON

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Return the concrete backend ("torch" or "triton") for `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and tensor.is_cuda) else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed")
    return backend


def check_backend(backend: str, device: torch.device) -> None:
    """Fail early, in one line, when ``backend`` cannot run on ``device`` (a ValueError)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "triton":
        return
    if not HAS_TRITON:
        raise ValueError("backend 'triton' needs the triton package, which is not installed")
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to interpret the "
            "kernels on the CPU, slowly)"
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto"):
    if resolve_backend(backend, x) == "triton":
        return _rmsnorm.rms_norm_triton(x, weight, eps)
    return _rmsnorm.rms_norm_reference(x, weight, eps)


def attention(q, k, v, lengths=None, scale=None, backend: str = "auto", document_ids=None):
    """Causal attention: q [B, H, T, D], k and v [B, Hkv, T, D] with H a multiple of Hkv
    (grouped-query attention; Hkv == H is multi-head); see :mod:`tritonlm.kernels.attention`.
    `document_ids` [B, T] (packed rows): a query sees only earlier keys of its own document.

    ``auto`` keeps head dims the kernels were not built for on the reference path, so any
    model config trains on a GPU; an explicit ``triton`` raises for them instead.
    """
    chosen = resolve_backend(backend, q)
    if backend == "auto" and q.shape[-1] not in _attention.SUPPORTED_HEAD_DIMS:
        chosen = "torch"
    if chosen == "triton":
        return _attention.attention_triton(q, k, v, lengths, scale, document_ids)
    return _attention.attention_reference(q, k, v, lengths, scale, document_ids)


def cross_entropy(logits, targets, ignore_index: int = -100, backend: str = "auto"):
    if resolve_backend(backend, logits) == "triton":
        return _cross_entropy.cross_entropy_triton(logits, targets, ignore_index)
    return _cross_entropy.cross_entropy_reference(logits, targets, ignore_index)


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100, backend: str = "auto"):
    """Loss of (hidden @ weight.T) without materializing all logits on the Triton path."""
    if resolve_backend(backend, hidden) == "triton":
        return _cross_entropy.linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    return _cross_entropy.linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
