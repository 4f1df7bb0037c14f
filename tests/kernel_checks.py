"""Shared helpers for kernel tests: poisoned allocations and float64 comparisons.

Habit (llm.c ``dev/cuda``): every kernel is checked against the torch reference run in
float64 on the same inputs, and every buffer a kernel should fill starts out as NaN, so
an element the kernel forgot to write shows up as a failure instead of as stale zeros.

Usage::

    from kernel_checks import assert_close64, float64_run, poisoned_allocations, tolerance

    with poisoned_allocations(rmsnorm_module):
        out, grads = run_with_grads(fn, [x, w], grad_out)
    ref, ref_grads = float64_run(reference_fn, [x, w], grad_out)
    assert_close64(out, ref, *tolerance(x.dtype), name="y")
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence

import torch

# (atol, rtol) for results of a kernel run in `dtype` against a float64 reference.
# float32: fp32 accumulation, only reduction-order differences (a few ulps of the largest
# partial sums); float16: inputs and outputs rounded to 11-bit mantissas (2**-11 ~ 4.9e-4
# relative per rounding); bfloat16: 8-bit mantissas (2**-8 ~ 3.9e-3 per rounding).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for `dtype`, both multiplied by `scale` (for deeper reductions)."""
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol * scale


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` in place with NaN (floating) or the dtype's max (integer); return it."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


def _poisoned(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapper(*args, **kwargs):
        return poison_(fn(*args, **kwargs))

    return wrapper


class _PoisonedTorch(types.ModuleType):
    """Stands in for `torch` inside one module: `empty*` return NaN-filled tensors."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.empty = _poisoned(torch.empty)
        self.empty_like = _poisoned(torch.empty_like)
        self.empty_strided = _poisoned(torch.empty_strided)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def poisoned_allocations(*modules: types.ModuleType) -> Iterator[None]:
    """Within the block, `torch.empty`, `torch.empty_like` and `torch.empty_strided` as
    called from the given modules (through their global name ``torch``) return tensors
    filled with NaN / int max. Kernel modules should therefore allocate the buffers their
    kernels fill with those three functions (not ``x.new_empty``)."""
    saved = []
    try:
        for module in modules:
            saved.append((module, module.torch))
            module.torch = _PoisonedTorch()
        yield
    finally:
        for module, original in reversed(saved):
            module.torch = original


def run_with_grads(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | object],
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run ``fn(*inputs)`` on detached copies of the floating inputs (requiring grad),
    backpropagate `grad_out` (or 1 for a scalar), and return (output, grads).

    Non-tensor and non-floating inputs are passed through; their grad slot is None."""
    leaves: list[torch.Tensor | object] = []
    for item in inputs:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            leaves.append(item.detach().clone().requires_grad_(True))
        else:
            leaves.append(item)
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    out.backward(grad_out.to(out.dtype))
    grads = [
        leaf.grad if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None
        for leaf in leaves
    ]
    return out.detach(), grads


def float64_run(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | object],
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Like :func:`run_with_grads`, but every floating input (and `grad_out`) is first
    converted to float64, so the result is the exact-as-possible reference."""
    converted = [
        item.detach().double()
        if isinstance(item, torch.Tensor) and item.is_floating_point()
        else item
        for item in inputs
    ]
    return run_with_grads(fn, converted, None if grad_out is None else grad_out.double())


def assert_close64(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    name: str = "tensor",
) -> None:
    """Compare in float64: |actual - expected| <= atol + rtol * |expected| everywhere,
    same shape, and no NaN/inf where the expected value is finite. The message names the
    worst element."""
    assert actual is not None, f"{name}: no value (gradient missing?)"
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad_nan = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_nan.any():
        idx = tuple(int(i) for i in bad_nan.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad_nan.sum())} non-finite element(s) where the reference is finite "
            f"(first at {idx}: {a[idx].item()} vs {e[idx].item()}) - unwritten output?"
        )
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    excess = err - allowed
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())}/{e.numel()} element(s) out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at {idx}: {a[idx].item()!r} vs "
            f"{e[idx].item()!r}, max abs err {err.max().item():.3g}"
        )


def check_attention_against_float64(
    attn: types.ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    out_tol: tuple[float, float],
    grad_tol: tuple[float, float],
    lengths: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """`attn.attention_triton` (poisoned buffers) against `attn.attention_reference` in
    float64: the output within `out_tol`, dq/dk/dv within `grad_tol` (each (atol, rtol)).
    Returns the kernel's (out, [dq, dk, dv])."""

    def triton_fn(q_, k_, v_):
        return attn.attention_triton(q_, k_, v_, lengths, None, document_ids)

    def reference_fn(q_, k_, v_):
        return attn.attention_reference(q_, k_, v_, lengths, None, document_ids)

    with poisoned_allocations(attn):
        out, grads = run_with_grads(triton_fn, [q, k, v], do)
    ref, ref_grads = float64_run(reference_fn, [q, k, v], do)
    assert_close64(out, ref, *out_tol, name="out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close64(g, rg, *grad_tol, name=name)
    return out, grads
