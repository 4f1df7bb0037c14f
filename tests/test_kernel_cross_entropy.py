"""Cross-entropy and fused linear + cross-entropy (interpreter) against float64 references.

Tolerances (atol, rtol): kernel_checks.TOLERANCES per dtype. The CE gradient is stored in
the logits' dtype after scaling by 1/n_valid, so it is compared with the same per-dtype
tolerance. Linear CE grads are sums over V or over N of products, compared with 4x.
Buffers the kernels fill start as NaN (poisoned_allocations).
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
from tritonlm.kernels import cross_entropy as ce
from tritonlm.kernels import dispatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(n, vocab, ignore_index, gen, ignore_every=3):
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[::ignore_every] = ignore_index  # ignore_index everywhere
    return t


def _check_ce(logits, targets, ignore_index=-100, grad_out=2.5):
    go = torch.tensor(grad_out)

    def fn(x, t):
        return ce.cross_entropy_triton(x, t, ignore_index)

    with poisoned_allocations(ce):
        loss, (grad, _) = run_with_grads(fn, [logits, targets], go)
    loss64, (grad64, _) = float64_run(
        lambda x, t: ce.cross_entropy_reference(x, t, ignore_index), [logits, targets], go
    )
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    atol, rtol = tolerance(logits.dtype)
    assert_close64(loss, loss64, atol, rtol, "loss")
    assert_close64(grad, grad64, atol, rtol, "dlogits")
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,vocab", [(1, 1), (5, 7), (9, 130), (4, 5000)])
def test_cross_entropy_matches_float64_reference(n, vocab, dtype):
    g = torch.Generator().manual_seed(n * 1000 + vocab)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    _check_ce(logits, _targets(n, vocab, -100, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cross_entropy_custom_ignore_index_leaves_logits_untouched(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g).to(dtype)
    targets = _targets(6, 300, 7, g)  # a custom ignore_index that is also a valid class
    _check_ce(logits, targets, ignore_index=7)
    buf = logits.clone()
    loss = ce.cross_entropy_triton(buf, targets, 7)  # no grad wanted: loss only
    assert torch.equal(buf, logits)
    assert_close64(loss, ce.cross_entropy_reference(logits.double(), targets, 7), 2e-3, 2e-3)
    buf = logits.clone().requires_grad_(True)
    ce.cross_entropy_triton(buf * 1.0, targets, 7).backward()  # the gradient has its own buffer
    assert torch.equal(buf.detach(), logits)


def test_backward_twice_gives_the_same_gradient():
    """The saved gradient is scaled out of place, so a retained graph can run again."""
    x = torch.randn(3, 10, requires_grad=True)
    loss = ce.cross_entropy_triton(x, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_all_ignored_gives_zero_loss_and_zero_grads(dtype):
    logits = torch.randn(5, 40).to(dtype)
    loss, grad = _check_ce(logits, torch.full((5,), -100))
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_extreme_logits_do_not_overflow(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g)
    logits[0, 17] = 1e4  # one huge winner (a naive exp overflows)
    logits[1] = 1e4  # a flat row of huge values
    logits[2, :2500] = -1e4  # huge negatives
    logits[3, 4999] = 1e4  # the max in the last, partial block
    logits[4, 0] = -1e4
    targets = torch.tensor([17, 3, 2600, 0, 0, -100])
    loss, grad = _check_ce(logits.to(dtype), targets)
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
    assert loss.item() > 1e3  # rows 3 and 4 pay ~1e4: the big values were kept


def test_out_of_range_target_is_rejected():
    with pytest.raises(ValueError, match="targets"):
        ce.cross_entropy_triton(torch.randn(2, 5), torch.tensor([1, 5]))


def test_public_entries_reject_bad_inputs():
    """Each public function checks shapes, dtypes and devices once, before any launch."""
    x, t = torch.randn(3, 5), torch.tensor([0, 4, -100])
    bad_ce = [
        ((x[None], t), r"logits \[N, V\]"),
        ((x.double(), t), "float32, float16 or bfloat16"),
        ((x, t[:2]), r"targets must be \[N=3\]"),
        ((x, t.float()), "int64 or int32"),
    ]
    for args, message in bad_ce:
        with pytest.raises(ValueError, match=message):
            ce.cross_entropy_triton(*args)
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    bad_linear = [
        ((h, w[:, :3], t), r"hidden \[N, d\] and weight \[V, d\]"),
        ((h, w.half(), t), "share a dtype"),
        ((h, w, torch.tensor([0, 5, 1])), r"targets must be in \[0, 5\)"),
        ((h, w, t, -100, 0), "chunk_size"),
    ]
    for impl in LINEAR_IMPLS.values():
        for args, message in bad_linear:
            with pytest.raises(ValueError, match=message):
                impl(*args)


def test_dispatch_triton_backend_cross_entropy():
    x, t = torch.randn(4, 33), torch.tensor([0, 32, -100, 5])
    loss = dispatch.cross_entropy(x, t, backend="triton")
    assert_close64(loss, ce.cross_entropy_reference(x.double(), t), 1e-5, 1e-5)


# ------------------------------------------------------------ fused linear + cross-entropy

LINEAR_IMPLS = {
    "triton": ce.linear_cross_entropy_triton,
    "chunked_torch": ce.linear_cross_entropy_chunked_torch,
}


def _check_linear(impl, hidden, weight, targets, chunk_size, ignore_index=-100, go=1.5):
    def fn(h, w, t):
        return LINEAR_IMPLS[impl](h, w, t, ignore_index, chunk_size=chunk_size)

    with poisoned_allocations(ce):
        loss, (dh, dw, _) = run_with_grads(fn, [hidden, weight, targets], torch.tensor(go))
    loss64, (dh64, dw64, _) = float64_run(
        lambda h, w, t: ce.linear_cross_entropy_reference(h, w, t, ignore_index),
        [hidden, weight, targets],
        torch.tensor(go),
    )
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    atol, rtol = tolerance(hidden.dtype)
    assert_close64(loss, loss64, atol, rtol, "loss")
    assert_close64(dh, dh64, *tolerance(hidden.dtype, 4.0), "dhidden")
    assert_close64(dw, dw64, *tolerance(weight.dtype, 4.0), "dweight")
    return loss, dh, dw


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,chunk", [(37, 8), (16, 16), (5, None), (3, 1)])
def test_linear_cross_entropy_matches_reference(impl, dtype, n, chunk):
    g = torch.Generator().manual_seed(n)
    hidden = (torch.randn(n, 24, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(70, 24, generator=g) * 0.5).to(dtype)
    _check_linear(impl, hidden, weight, _targets(n, 70, -100, g, ignore_every=4), chunk)


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
def test_linear_cross_entropy_all_ignored(impl):
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    loss, dh, dw = _check_linear(impl, hidden, weight, torch.full((10,), -1), 4, ignore_index=-1)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_linear_cross_entropy_only_hidden_needs_grad():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    t = torch.randint(0, 30, (9,))
    ce.linear_cross_entropy_triton(hidden, weight, t, chunk_size=4).backward()
    ref = hidden.detach().double().requires_grad_(True)
    ce.linear_cross_entropy_reference(ref, weight.double(), t).backward()
    assert_close64(hidden.grad, ref.grad, 4e-5, 4e-5, "dhidden")
    assert weight.grad is None


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
def test_linear_cross_entropy_under_bf16_autocast(impl):
    """fp32 hidden and weight (a model's fp32 residual stream) under bf16 autocast: the op
    projects in bf16, like the reference's matmul, and the fp32 leaves get fp32 grads."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g) * 0.5
    targets = _targets(9, 40, -100, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (dh, dw, _) = run_with_grads(
            lambda h, w, t: LINEAR_IMPLS[impl](h, w, t, chunk_size=4), [hidden, weight, targets]
        )
    rounded = [hidden.bfloat16(), weight.bfloat16(), targets]  # what the bf16 matmul reads
    loss64, (dh64, dw64, _) = float64_run(ce.linear_cross_entropy_reference, rounded)
    assert dh.dtype == dw.dtype == torch.float32
    assert_close64(loss, loss64, *tolerance(torch.bfloat16), "loss")
    assert_close64(dh, dh64, *tolerance(torch.bfloat16, 2.0), "dhidden")
    assert_close64(dw, dw64, *tolerance(torch.bfloat16, 2.0), "dweight")


def test_dispatch_triton_backend_linear_cross_entropy():
    h, w, t = torch.randn(6, 8), torch.randn(20, 8), torch.tensor([0, 19, -100, 5, 5, 1])
    loss = dispatch.linear_cross_entropy(h, w, t, backend="triton")
    assert_close64(loss, ce.linear_cross_entropy_reference(h.double(), w.double(), t), 1e-5, 1e-5)


def test_chunk_rows_takes_the_fewest_even_chunks_within_the_budget():
    assert ce.chunk_rows(8192, 128256, 2**27) == 1024  # 8 chunks (Liger's rule: 32 of 256)
    assert ce.chunk_rows(16384, 50257, 2**27) == 2352  # 7 chunks, the last 2272 rows
    assert ce.chunk_rows(10, 32000) == 10
    assert ce.chunk_rows(16384, 2**28, 2**27) == 1
    assert ce.chunk_rows(100, 1000, 1000, min_rows=8) == 8  # min_rows beats the budget
    for n in (1, 37, 8192, 100_000):
        for vocab in (1, 100, 32000, 50257, 128256, 10**6):
            for budget in (2**20, 2**25, 2**27):
                rows = ce.chunk_rows(n, vocab, budget)
                assert 1 <= rows <= n
                assert rows * vocab <= max(budget, vocab)
                fewest = -(-n // max(1, budget // vocab))
                assert -(-n // rows) == fewest, (n, vocab, budget, rows)
