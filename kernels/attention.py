"""Causal multi-head attention (FlashAttention-style Triton kernels follow the reference).

Layout: q, k, v are [B, H, T, D]. Optional `lengths` [B] (int, each >= 1) marks the valid
prefix of each sequence in a right-padded batch: keys at positions >= length are masked,
and outputs at query positions >= length are exactly zero (so their gradients are zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The one torch reference (SDPA math, any dtype including float64)."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, T]
    mask = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # [B, Tq, Tk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return out * valid[:, None, :, None].to(out.dtype)
