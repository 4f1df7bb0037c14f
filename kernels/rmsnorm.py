"""RMSNorm: y = x / rms(x) * w over the last dimension.

Torch reference below; the Triton kernels and their autograd Function follow it.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The one torch reference. Half-precision inputs are computed in float32."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)
