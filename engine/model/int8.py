"""Weight-only int8 for CPU chat: each block matrix stored as int8 with one scale per row.

Why: a one-row decode step reads every weight once, so its time is memory traffic; int8
weights are a quarter of float32's. Activations stay in float; a matrix product
dequantizes (``q.to(x.dtype) * scale`` folded into the output: ``(x @ q^T) * scale``); a
compiled decode step's product of a few rows is a multiply-and-sum instead
(:mod:`.row_products`), one fused pass over the int8 weights. The embedding, norms and
RoPE stay in float. Symmetric rounding to [-127, 127].

    >>> quantize_int8(model)   # in place; returns the number of matrices converted
    32
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .row_products import fuse_rows, rows_product

__all__ = ["Int8Linear", "quantize_int8"]

# The block matrices (names as in transformer.py); the output projection is quantize_int8's
# ``head``; everything else stays float.
_MATRICES = ("attn.qkv", "attn.proj", "ffn.gate_up", "ffn.down")


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
        if fuse_rows(x):  # compiled decode: w is converted in registers, never stored
            return rows_product(x, w) * scale
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
