"""Matrix products of a few rows, written so that inductor fuses them on the CPU.

Why: a decode step multiplies one row per sequence by every weight matrix. Compiled on
the CPU, ``F.linear`` stays a call into torch's general matrix product, and an int8
weight is first copied to float32 whole, every step. Written as a multiply-and-sum,
``(x[:, None, :] * w).sum(-1)``, inductor generates one vectorized loop that reads each
row of ``w`` once (int8 converted in registers) and fuses it with the neighbouring
elementwise ops. With the other changes of the compiled step (decode_step.py), `small`
decoded 1,673-1,743 tokens/s in int8 and 549-658 in float32, against 295-309 and 290-377
before (1 thread, vocab 8192; benchmarks/RESULTS.md, "Decode step"). Eager steps and
wider products (a prefill) keep the matrix product, which reuses each weight row.

    >>> y = rows_product(x, w) if fuse_rows(x) else F.linear(x, w)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

__all__ = ["FUSED_ROWS", "compiling_on_cpu", "fuse_rows", "linear_rows", "rows_product"]

# Products of at most this many rows take the multiply-and-sum form (a decode step's rows
# up to a small batch); each extra row reads the matrix once more, where a matrix product
# reads it once for all rows.
FUSED_ROWS = 4


def compiling_on_cpu(x: torch.Tensor) -> bool:
    """True while torch.compile traces code on CPU tensors (inductor's C++ loops)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def fuse_rows(x: torch.Tensor) -> bool:
    """True while torch.compile traces a product of x [n, in], n <= FUSED_ROWS, on the CPU."""
    return compiling_on_cpu(x) and x.dim() == 2 and x.shape[0] <= FUSED_ROWS


def rows_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] times w [out, in] transposed, as a multiply-and-sum: [n, out] (w may be
    int8 already converted with ``.to(x.dtype)``: inductor fuses the conversion)."""
    return (x[:, None, :] * w).sum(-1)


def linear_rows(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; for a plain bias-free ``nn.Linear`` under :func:`fuse_rows`, the
    multiply-and-sum form (other layers, e.g. int8 or LoRA ones, decide for themselves)."""
    if type(layer) is torch.nn.Linear and layer.bias is None and fuse_rows(x):
        return rows_product(x, layer.weight)
    return layer(x)
