"""Kernel correctness for gpu_check: every kernel's output and every gradient against float64.

Each case draws fresh random inputs (never zeros), runs the Triton kernel with every
buffer it fills allocated NaN-poisoned (tests/kernel_checks.py), runs the torch reference
on the same (rounded) inputs in float64, and reports ||out - ref|| / ||ref|| per tensor.
It then runs the kernel again on the same inputs and requires bitwise-equal outputs and
gradients (determinism). On a machine without CUDA the same code runs at tiny shapes
through Triton's interpreter (TRITON_INTERPRET=1; float32/float16 only).

Tolerances on the relative error (norm of the difference over norm of the reference),
per dtype, from the device method's rule of thumb:
  float32  1e-4  fp32 accumulation with exact ("ieee") dots: only summation order differs
                 (measured ~1e-6 on an H100), so 1e-4 still catches any real bug.
  float16  5e-3  11-bit mantissas: inputs, P and dS rounded to fp16 (~5e-4 per rounding).
  bfloat16 2e-2  8-bit mantissas (~4e-3 per rounding); measured 2e-3..4e-3 for attention.
Any non-finite value where the reference is finite fails the case (an unwritten element).
Torch's own error in the same dtype (its kernels on the rounded inputs) is recorded next
to ours as the yardstick.
"""

from __future__ import annotations

import torch
from kernel_checks import float64_run, poisoned_allocations, run_with_grads
from tritonlm.kernels import attention as attn
from tritonlm.kernels import cross_entropy as ce
from tritonlm.kernels import rmsnorm as rms

REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(actual: torch.Tensor | None, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf for a missing or non-finite value."""
    if actual is None:
        return float("inf")
    a, e = actual.detach().double(), expected.detach().double()
    if not bool((torch.isfinite(a) | ~torch.isfinite(e)).all()):
        return float("inf")  # NaN where the reference is finite: an unwritten element
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def _same(xs, ys) -> bool:
    """Bitwise equality of two lists of tensors (NaN-safe: compares the bytes)."""
    for x, y in zip(xs, ys, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and not torch.equal(_bytes(x), _bytes(y)):
            return False
    return True


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def check_op(name, kernel, reference, module, inputs, dtype, grad_out=None, case=None) -> dict:
    """Run one case: kernel (poisoned), again (determinism), torch in dtype, float64."""
    with poisoned_allocations(module):
        out, grads = run_with_grads(kernel, inputs, grad_out)
        out2, grads2 = run_with_grads(kernel, inputs, grad_out)
    low, low_grads = run_with_grads(reference, inputs, grad_out)  # torch in the same dtype
    ref, ref_grads = float64_run(reference, inputs, grad_out)
    names = ["out"] + [f"d{i}" for i, g in enumerate(ref_grads) if g is not None]
    ours = [out] + [g for g, r in zip(grads, ref_grads, strict=True) if r is not None]
    torchs = [low] + [g for g, r in zip(low_grads, ref_grads, strict=True) if r is not None]
    refs = [ref] + [r for r in ref_grads if r is not None]
    errs = {n: rel_err(a, r) for n, a, r in zip(names, ours, refs, strict=True)}
    torch_errs = {n: rel_err(a, r) for n, a, r in zip(names, torchs, refs, strict=True)}
    deterministic = _same([out] + list(grads), [out2] + list(grads2))
    tol = REL_TOL[dtype]
    ok = deterministic and all(e <= tol for e in errs.values())
    return {
        "kernel": name,
        "dtype": DTYPE_NAMES[dtype],
        "case": case,
        "rel_err": errs,
        "torch_rel_err": torch_errs,
        "tol": tol,
        "deterministic": deterministic,
        "ok": ok,
    }


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def attention_case(B, H, Hkv, T, D, dtype, lengths, device, seed) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = _randn((B, H, T, D), dtype, device, gen)
    k = _randn((B, Hkv, T, D), dtype, device, gen)
    v = _randn((B, Hkv, T, D), dtype, device, gen)
    do = _randn((B, H, T, D), dtype, device, gen)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    case = {"B": B, "H": H, "Hkv": Hkv, "T": T, "D": D, "lengths": lengths}
    return check_op(
        "attention",
        lambda q_, k_, v_: attn.attention_triton(q_, k_, v_, lens),
        lambda q_, k_, v_: attn.attention_reference(q_, k_, v_, lens),
        attn,
        [q, k, v],
        dtype,
        do,
        case,
    )


def rmsnorm_case(N, d, dtype, device, seed) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = _randn((N, d), dtype, device, gen)
    w = (1 + 0.1 * torch.randn(d, generator=gen, device=device)).to(dtype)
    dy = _randn((N, d), dtype, device, gen)
    return check_op(
        "rmsnorm",
        lambda x_, w_: rms.rms_norm_triton(x_, w_, 1e-6),
        lambda x_, w_: rms.rms_norm_reference(x_, w_, 1e-6),
        rms,
        [x, w],
        dtype,
        dy,
        {"N": N, "d": d},
    )


def _targets(N, V, device, gen):
    """Random classes with every third target ignored (-100)."""
    t = torch.randint(0, V, (N,), generator=gen, device=device)
    t[::3] = -100
    return t


def cross_entropy_case(N, V, dtype, device, seed) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = _randn((N, V), dtype, device, gen, scale=2.0)
    t = _targets(N, V, device, gen)
    return check_op(
        "cross_entropy",
        lambda x_: ce.cross_entropy_triton(x_, t, -100),
        lambda x_: ce.cross_entropy_reference(x_, t, -100),
        ce,
        [logits],
        dtype,
        torch.tensor(2.5, device=device),
        {"N": N, "V": V},
    )


def linear_cross_entropy_case(N, d, V, dtype, device, seed) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    h = _randn((N, d), dtype, device, gen)
    w = _randn((V, d), dtype, device, gen, scale=d**-0.5)
    t = _targets(N, V, device, gen)
    return check_op(
        "linear_cross_entropy",
        lambda h_, w_: ce.linear_cross_entropy_triton(h_, w_, t, -100),
        lambda h_, w_: ce.linear_cross_entropy_reference(h_, w_, t, -100),
        ce,
        [h, w],
        dtype,
        torch.tensor(1.5, device=device),
        {"N": N, "d": d, "V": V},
    )


# -- the plan: (tier, label, callable) ---------------------------------------------------
# Tier 0 covers every head dim, grouped and plain heads, lengths, every kernel and dtype
# at shapes that compile and run in seconds; tier 1 is the full shapes in bf16,
# tier 2 the same in fp16 and fp32. The interpreter (no CUDA) gets tiny tier-0 shapes.


def plan(device: str, quick: bool) -> list[tuple[int, str, object]]:
    if device != "cuda":
        dtypes = [torch.float32, torch.float16]  # the interpreter cannot do bf16 dots
    else:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
    items: list[tuple[int, str, object]] = []

    def add(tier, label, fn, *args):
        seed = len(items) + 1  # fresh inputs for every case
        items.append((tier, label, lambda: fn(*args, device=device, seed=seed)))

    if quick:
        for dt in dtypes:
            n = DTYPE_NAMES[dt]
            add(0, f"attn {n} gqa D32 T17 len", attention_case, 1, 4, 2, 17, 32, dt, [5])
            add(0, f"attn {n} D64 T9", attention_case, 1, 2, 2, 9, 64, dt, None)
            add(0, f"rmsnorm {n} d96", rmsnorm_case, 6, 96, dt)
            add(0, f"ce {n} V300", cross_entropy_case, 6, 300, dt)
            add(0, f"lce {n} V300", linear_cross_entropy_case, 6, 32, 300, dt)
        return items
    # tier 0: every head dim in bf16 with GQA + lengths, then the other dtypes
    for dt in dtypes:
        n = DTYPE_NAMES[dt]
        for D in (32, 64, 96, 128):
            lens = [1000, 537] if D != 64 else None
            add(0, f"attn {n} gqa D{D} T1000", attention_case, 2, 8, 2, 1000, D, dt, lens)
        add(0, f"attn {n} mha D128 T777", attention_case, 2, 8, 8, 777, 128, dt, None)
        add(0, f"attn {n} mha D64 T1 len", attention_case, 2, 4, 4, 1, 64, dt, [1, 1])
        for d in (768, 5000):
            add(0, f"rmsnorm {n} N1024 d{d}", rmsnorm_case, 1024, d, dt)
        for V in (32000, 128256):
            add(0, f"ce {n} N256 V{V}", cross_entropy_case, 256, V, dt)
        add(0, f"lce {n} N256 V50257", linear_cross_entropy_case, 256, 256, 50257, dt)
    # tiers 1 and 2: the shapes
    for tier, dts in ((1, dtypes[:1]), (2, dtypes[1:])):
        for dt in dts:
            n = DTYPE_NAMES[dt]
            for T in (1, 127, 1000, 2048, 4096):
                for D in (32, 64, 128):
                    lens = [T, max(1, T // 2), max(1, T - 3), 1]
                    add(tier, f"attn {n} B4 H12 T{T} D{D}", attention_case, 4, 12, 12, T, D, dt,
                        None)  # fmt: skip
                    add(tier, f"attn {n} B4 H12 T{T} D{D} len", attention_case, 4, 12, 12, T,
                        D, dt, lens)  # fmt: skip
            for d in (768, 2048, 4096, 5000):
                add(tier, f"rmsnorm {n} N16k d{d}", rmsnorm_case, 16384, d, dt)
            for V in (32000, 50257, 128256):
                add(tier, f"ce {n} N2048 V{V}", cross_entropy_case, 2048, V, dt)
                add(tier, f"lce {n} N2048 V{V}", linear_cross_entropy_case, 2048, 768, V, dt)
    return items
