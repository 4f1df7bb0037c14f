"""RMSNorm Triton kernels (interpreter) against the float64 torch reference.

Tolerances (atol, rtol) per dtype come from kernel_checks.TOLERANCES; dw sums over rows,
so it gets 4x. Every output buffer the kernels fill starts as NaN (poisoned_allocations).
"""

import pytest
import torch
from kernel_checks import (
    assert_close64,
    float64_run,
    poisoned_allocations,
    run_with_grads,
    tolerance,
)
from tritonlm.kernels import dispatch, rmsnorm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading shape, hidden): hidden sizes 1, 7, 100, 130, 4097 and one wider than MAX_BLOCK_N
# (the looping path); row counts that do not divide the backward's program count.
SHAPES = [((3,), 1), ((5,), 7), ((2, 3), 100), ((9,), 130), ((2,), 4097), ((3,), 9000)]


def _check(x, w, eps=1e-6, grad_scale=1.0):
    torch.manual_seed(1)
    dy = torch.randn(x.shape, dtype=x.dtype) * grad_scale
    with poisoned_allocations(rmsnorm):
        y, (dx, dw) = run_with_grads(lambda a, b: rmsnorm.rms_norm_triton(a, b, eps), [x, w], dy)
    y64, (dx64, dw64) = float64_run(lambda a, b: rmsnorm.rms_norm_reference(a, b, eps), [x, w], dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    atol, rtol = tolerance(x.dtype)
    assert_close64(y, y64, atol, rtol, "y")
    assert_close64(dx, dx64, atol, rtol, "dx")
    assert_close64(dw, dw64, *tolerance(w.dtype, 4.0), "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_rmsnorm_matches_float64_reference(lead, hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(*lead, hidden, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    _check(x, w)


def test_rmsnorm_half_input_fp32_weight_and_large_eps():
    x = torch.randn(6, 33).half()
    w = torch.randn(33)
    _check(x, w, eps=0.5)


def test_rmsnorm_strided_rows():
    """A column slice: row stride != hidden size, read without a copy."""
    base = torch.randn(7, 50)
    x = base[:, 3:40]
    assert not x.is_contiguous()
    _check(x, torch.randn(37))


def test_rmsnorm_zero_rows_and_tiny_values():
    x = torch.empty(0, 16)
    y = rmsnorm.rms_norm_triton(x, torch.ones(16))
    assert y.shape == (0, 16)
    # Rows of zeros and of tiny values: rstd = 1/sqrt(eps) stays finite.
    x = torch.cat([torch.zeros(2, 20), torch.full((2, 20), 1e-20)])
    _check(x, torch.randn(20))


def test_rmsnorm_through_dispatch_triton_backend():
    x, w = torch.randn(4, 24), torch.randn(24)
    y = dispatch.rms_norm(x, w, 1e-5, backend="triton")
    assert_close64(y, rmsnorm.rms_norm_reference(x.double(), w.double(), 1e-5), 1e-5, 1e-5)


def test_rmsnorm_rejects_bad_inputs():
    with pytest.raises(ValueError, match="hidden size"):
        rmsnorm.rms_norm_triton(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rmsnorm.rms_norm_triton(torch.randn(2, 8).double(), torch.randn(8))
    with pytest.raises(ValueError, match="hidden >= 1"):
        rmsnorm.rms_norm_triton(torch.randn(2, 0), torch.randn(0))


def test_block_config_masks_non_powers_of_two():
    assert rmsnorm.block_config(768) == (1024, True)
    assert rmsnorm.block_config(1) == (1, True)
    block, one_pass = rmsnorm.block_config(rmsnorm.MAX_BLOCK_N + 1)
    assert block == rmsnorm.MAX_BLOCK_N and not one_pass


# (rows, hidden, forward config, backward config): rows that do not fill the last tile,
# the looping path at a small column block (3 blocks, the last partial), several rows per
# tile there too, and a persistent grid of 1 and of 8 programs (4 "SMs" on the CPU).
EXPLICIT = [
    (11, 37, dict(block_m=4, block_n=64, one_pass=True, num_warps=4),
     dict(block_m=4, block_n=64, one_pass=True, num_warps=4, programs_per_sm=1)),
    (7, 37, dict(block_m=2, block_n=16, one_pass=False, num_warps=4),
     dict(block_m=2, block_n=16, one_pass=False, num_warps=4, programs_per_sm=2)),
    (9, 20, dict(block_m=8, block_n=32, one_pass=True, num_warps=4),
     dict(block_m=1, block_n=32, one_pass=True, num_warps=4, programs_per_sm=2)),
    (5, 50, dict(block_m=1, block_n=16, one_pass=False, num_warps=4),
     dict(block_m=4, block_n=16, one_pass=False, num_warps=4, programs_per_sm=1)),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows,hidden,fwd,bwd", EXPLICIT)
def test_rmsnorm_launch_configs_match_float64(rows, hidden, fwd, bwd, dtype):
    """Every tiling the table or the sweep may pick gives the reference's y, dx and dw."""
    g = torch.Generator().manual_seed(rows * 100 + hidden)
    x = (torch.randn(rows, hidden, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    with poisoned_allocations(rmsnorm):
        y, rstd = rmsnorm.run_forward(x, w, 1e-6, fwd)
        dx, dw = rmsnorm.run_backward(dy, x, w, rstd, bwd)
    y64, (dx64, dw64) = float64_run(lambda a, b: rmsnorm.rms_norm_reference(a, b), [x, w], dy)
    atol, rtol = tolerance(dtype)
    assert_close64(y, y64, atol, rtol, "y")
    assert_close64(dx, dx64, atol, rtol, "dx")
    assert_close64(dw, dw64, *tolerance(dtype, 4.0), "dw")
    again = rmsnorm.run_backward(dy, x, w, rstd, bwd)  # same grid: bitwise the same sums
    assert torch.equal(again[0], dx) and torch.equal(again[1], dw)


def test_backward_grid_covers_every_tile_once():
    for rows, block_m, per_sm in [(1, 1, 4), (16384, 1, 4), (11, 4, 1), (1000, 2, 8)]:
        programs, per_program = rmsnorm.backward_grid(rows, block_m, per_sm, torch.device("cpu"))
        tiles = -(-rows // block_m)
        assert 1 <= programs <= max(1, per_sm * 4)
        assert (programs - 1) * per_program < tiles <= programs * per_program
