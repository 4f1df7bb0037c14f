"""Weight-only int8 for CPU chat: each block matrix stored as int8 with one scale per row.

Why: a one-row decode step reads every weight once, so its time is memory traffic; int8
weights are a quarter of float32's. Activations stay in float; a matrix product
dequantizes (``q.to(x.dtype) * scale`` folded into the output: ``(x @ q^T) * scale``). Under
``torch.compile`` a product of a few rows is written as a multiply-and-sum instead, which
inductor turns into one loop over the int8 weights; written as a matrix product, inductor
first copied every matrix to float32 on every step and then called the float product
(`small`, 1 thread: 1.6-2.0 ms per step before, 1.1 ms after; benchmarks/RESULTS.md).
The embedding (tied to the output projection), norms and RoPE stay in float. Symmetric
rounding to [-127, 127].

    >>> quantize_int8(model)   # in place; returns the number of matrices converted
    32
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FUSED_ROWS", "Int8Linear", "quantize_int8"]

# The block matrices (names as in transformer.py); everything else stays float.
_MATRICES = ("attn.qkv", "attn.proj", "ffn.gate_up", "ffn.down")
# Compiled products of at most this many rows take the multiply-and-sum form (a decode
# step's rows); wider ones (a prefill) stay matrix products, which reuse each weight.
FUSED_ROWS = 4


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 ``q`` [out, in] times ``scale`` [out]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.q.to(x.dtype), self.scale.to(x.dtype)
        if torch.compiler.is_compiling() and x.dim() == 2 and x.shape[0] <= FUSED_ROWS:
            return (x[:, None, :] * w).sum(-1) * scale  # [n, out]: fused, never materialized
        return F.linear(x, w) * scale

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer multiplies by (for tests and error estimates)."""
        return self.q.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module, head: bool = False) -> int:
    """Replace every block's q/k/v, output, gate/up and down matrices by Int8Linear, in
    place (inference only: the int8 weights have no gradient). ``head``: also give the
    model an int8 copy of its output projection (``model.int8_head``, used by
    ``model.project``; the float matrix stays for the embedding it is tied to). Returns
    how many matrices were quantized."""
    n = 0
    if head and model.int8_head is None:
        model.int8_head = Int8Linear(model.output_weight)
        n += 1
    for block in model.blocks:
        for path in _MATRICES:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear):
                setattr(parent, name, Int8Linear(linear.weight))
                n += 1
    return n
