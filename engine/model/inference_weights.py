"""Weights prepared for inference: optional int8, and a column-major layout on the CPU
for eager decode steps (a compiled step keeps row-major weights for its fused products).

Why the layout: a decode step multiplies one row by every weight matrix, so its time is
the weights streamed from memory. torch's CPU kernel for ``x @ W^T`` reads a row-major
``W`` [out, in] at about 11 GB/s on one core of our test machine and ``W`` stored
column-major (``W^T`` contiguous, the plain ``x @ Wt`` product) at about 17 GB/s; the whole
step of ``small`` took 1.5x less time (benchmarks/RESULTS.md, "Decode step"). Only the
strides change: same shapes, same values, same Parameter objects (a tied embedding stays
tied), so every caller and kernel sees the model it had. Training keeps row-major
weights (the optimizer and safetensors want contiguous tensors): only the inference front
ends (``llm-chat``, ``llm-serve``, ``llm-eval``) call :func:`prepare_inference_weights`.

    >>> prepare_inference_weights(model, "int8")   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import SettingError
from .int8 import Int8Linear, quantize_int8

__all__ = ["WEIGHT_FORMATS", "column_major", "prepare_inference_weights"]

WEIGHT_FORMATS = ("fp32", "int8")  # --weights of the inference commands


def column_major(model: torch.nn.Module) -> int:
    """In place: every 2-D weight of ``model`` that lives on the CPU stored column-major,
    the int8 matrices too. Returns how many tensors changed."""
    done: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                if p.dim() == 2 and p.device.type == "cpu" and id(p) not in done:
                    done.add(id(p))  # a tied weight is one Parameter: re-laid out once
                    p.data = p.data.t().contiguous().t()  # [out, in], strides (1, out)
            if isinstance(mod, Int8Linear) and mod.q.device.type == "cpu":
                done.add(id(mod))
                mod.q = mod.q.t().contiguous().t()  # q.to(float) keeps these strides
    return len(done)


def prepare_inference_weights(
    model: torch.nn.Module, weights: str = "fp32", *, compiled: bool = False
) -> torch.nn.Module:
    """``model`` ready to decode: its matrices in int8 when ``weights`` is "int8",
    and on the CPU every matrix column-major for the eager step's matrix products. A
    ``compiled`` step keeps the weights as trained, row-major: its fused multiply-and-sum
    products (:mod:`.row_products`) read one weight row per output (the fused float32 step
    of `small` made 519-704 tokens/s against 290-377 for the column-major matrix products
    before; 1 thread, benchmarks/RESULTS.md). int8 covers the output projection too
    (``model.int8_head``; the embedding lookup stays float), so every front end scores and
    decodes the same weights.
    Returns the model (changed in place)."""
    if weights not in WEIGHT_FORMATS:
        raise SettingError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}",
                           field="weights")  # fmt: skip
    if weights == "int8":
        quantize_int8(model, head=True)
    if not compiled:
        column_major(model)
    return model
