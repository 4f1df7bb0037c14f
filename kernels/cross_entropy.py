"""Softmax cross-entropy over the vocabulary, and fused linear + cross-entropy.

Loss is the mean over targets that are not `ignore_index`; when every target is ignored
the loss is 0 and all gradients are 0 (torch's own function would return NaN).

Layout (Liger-Kernel habit): torch references, Triton kernel, plain Python launchers,
thin autograd Functions.

Cross-entropy kernel: one program per row. Pass 1 streams the row in BLOCK_V blocks with
an online logsumexp (running max m and running sum d of exp(x - m), rescaled whenever m
grows), so no block ever exponentiates a large positive number and logits of 1e4 are fine.
Pass 2 writes the gradient of the *mean* loss, (softmax - onehot) / n_valid, already in the
forward pass. The backward then only multiplies that buffer by grad_output.

Where the gradient goes (the in-place rule): ``cross_entropy_triton(..., inplace=True)``
writes it over the logits buffer itself, so no second [N, V] tensor exists. Use it only
when nothing else needs the logits values afterwards (the usual "logits feed only the
loss" case). The logits' autograd version counter is bumped, so if another autograd node
saved the logits for its own backward, that backward raises instead of silently using the
overwritten values. The default (``inplace=False``, what dispatch uses) writes into a
fresh buffer of the logits' dtype. Either way the buffer is scaled in place in backward,
so the backward of one loss can run once (a second run raises).

Fused linear + cross-entropy processes tokens in chunks: per chunk, logits = h @ W.T, the
CE step writes the gradient into those chunk logits in place, then grad_h[chunk] = g @ W
and grad_W += g.T @ h (fp32 accumulator). All of that happens in the forward pass; the
backward scales the saved gradients. Chunk rows = LOGITS_CHUNK_ELEMENTS // V (so one
chunk's logits hold at most 2**25 elements: 64 MiB in bf16, 128 MiB in fp32), at least 1,
rounded down to a multiple of 16 when larger than 16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._triton import HAS_TRITON, tl, triton


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The one torch reference: logits [N, V], targets [N] -> scalar mean loss."""
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    losses = torch.nn.functional.cross_entropy(
        logits.to(compute), targets, ignore_index=ignore_index, reduction="none"
    )
    count = (targets != ignore_index).sum().clamp_min(1)
    return losses.sum() / count


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Reference for the fused op: mean loss of hidden [N, d] @ weight[V, d].T."""
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index)


# Widest vocabulary block one program streams at a time.
MAX_BLOCK_V = 4096
# Largest number of logits one chunk of the fused linear cross-entropy holds.
LOGITS_CHUNK_ELEMENTS = 2**25

if HAS_TRITON:

    @triton.jit
    def _cross_entropy_fwd_kernel(
        LOGITS,
        GRAD,
        TARGETS,
        LOSS,
        N_VALID,
        stride_logits,
        stride_grad,
        n_cols,
        ignore_index,
        BLOCK_V: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        """Row loss (0 if ignored) into LOSS[row]; if WRITE_GRAD, the row of d(mean)/dx
        into GRAD (which may be LOGITS itself: each element is read before it is written)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = LOGITS + row * stride_logits
        g_row = GRAD + row * stride_grad
        cols = tl.arange(0, BLOCK_V)
        target = tl.load(TARGETS + row).to(tl.int64)
        if target == ignore_index:
            tl.store(LOSS + row, 0.0)
            if WRITE_GRAD:
                zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(GRAD.dtype.element_ty)
                for start in range(0, n_cols, BLOCK_V):
                    c = start + cols
                    tl.store(g_row + c, zeros, mask=c < n_cols)
        else:
            m = -float("inf")
            d = 0.0
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                x = tl.load(x_row + c, mask=c < n_cols, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)
            x_target = tl.load(x_row + target).to(tl.float32)
            tl.store(LOSS + row, lse - x_target)
            if WRITE_GRAD:
                inv_n = 1.0 / tl.load(N_VALID)
                for start in range(0, n_cols, BLOCK_V):
                    c = start + cols
                    mask = c < n_cols
                    x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                    p = tl.exp(x - lse)
                    g = tl.where(c == target, p - 1.0, p) * inv_n
                    tl.store(g_row + c, g.to(GRAD.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def block_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of `n_cols`: 100 -> (128, 4); 50257 -> (4096, 8)."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_V)
    return block, (4 if block <= 1024 else 8)


def count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored targets as a float32 tensor on the targets' device, at least
    1 (so an all-ignored batch gives loss 0 and gradients 0). No host sync."""
    return (targets != ignore_index).sum().clamp_min(1).to(torch.float32)


def _check_targets(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not targets.is_cuda and targets.numel():  # checking CUDA targets would sync
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {logits.shape[1]}) or {ignore_index}")


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    n_valid: torch.Tensor,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the kernel: per-row losses [N] fp32 (0 where ignored). If `grad` is given
    ([N, V], may be `logits` itself) it receives (softmax - onehot) / n_valid."""
    n_rows, n_cols = logits.shape
    losses = torch.empty((n_rows,), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return losses
    if logits.stride(-1) != 1 or (grad is not None and grad.stride(-1) != 1):
        raise ValueError("logits and grad need a contiguous last dimension")
    block, num_warps = block_config(n_cols)
    write_grad = grad is not None
    g = grad if write_grad else logits  # never written when WRITE_GRAD is False
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits, g, targets.contiguous(), losses, n_valid, logits.stride(0), g.stride(0),
        n_cols, ignore_index, BLOCK_V=block, WRITE_GRAD=write_grad, num_warps=num_warps,
    )  # fmt: skip
    return losses


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    compute_grad: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean loss fp32 scalar, gradient of that loss w.r.t. logits or None)."""
    _check_targets(logits, targets, ignore_index)
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace cross-entropy needs logits with a contiguous last dim")
        logits = logits.contiguous()
    n_valid = count_valid(targets, ignore_index)
    grad = None
    if compute_grad:
        grad = (
            logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        )
    losses = cross_entropy_rows(logits, targets, ignore_index, n_valid, grad)
    return losses.sum() / n_valid, grad


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Backward of a loss whose gradient was computed in the forward: grad *= grad_output."""
    return grad.mul_(grad_output.to(grad.dtype))


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace):
        compute_grad = ctx.needs_input_grad[0]
        loss, grad = cross_entropy_forward(logits, targets, ignore_index, compute_grad, inplace)
        if inplace and compute_grad:
            torch.autograd.graph.increment_version(logits)  # its values are now the gradient
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("cross_entropy_triton backward ran twice (its buffer is reused)")
        ctx.grad = None
        return scale_grad_(grad, grad_output), None, None, None


def cross_entropy_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, inplace: bool = False
) -> torch.Tensor:
    """Mean cross-entropy through the Triton kernel (contract of the reference).

    inplace=True overwrites `logits` with the gradient during the forward (see module doc).
    """
    if not HAS_TRITON:
        raise RuntimeError("cross_entropy_triton needs the triton package")
    return _CrossEntropyFunction.apply(logits, targets, ignore_index, inplace)


# ------------------------------------------------------- fused linear + cross-entropy


def chunk_rows(n_rows: int, vocab: int, budget: int = LOGITS_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so a chunk's logits hold at most `budget` elements.

    Example: chunk_rows(16384, 32000) -> 1040; chunk_rows(16384, 128256) -> 256.
    """
    rows = max(1, budget // max(vocab, 1))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, n_rows))


CeStep = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]


def ce_step_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_valid: torch.Tensor
) -> torch.Tensor:
    """CE step of the chunk loop: row losses; gradient written into `logits` in place."""
    return cross_entropy_rows(logits, targets, ignore_index, n_valid, logits)


def ce_step_torch(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_valid: torch.Tensor
) -> torch.Tensor:
    """The same step in torch ops (for the CPU memory comparison and as a cross-check)."""
    x = logits.float()  # the same tensor when logits are fp32: then all below is in place
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=-1)
    losses = (lse - x.gather(1, safe[:, None]).squeeze(1)) * valid
    g = x.sub_(lse[:, None]).exp_() if x is logits else torch.exp(x - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
    g.mul_((valid.float() / n_valid)[:, None])
    if g is not logits:
        logits.copy_(g)
    return losses


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    ce_step: CeStep,
    chunk_size: int | None = None,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss fp32, grad_hidden or None, grad_weight or None), chunk by chunk."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n_rows,):
        raise ValueError(f"targets shape {tuple(targets.shape)} != ({n_rows},)")
    hidden = hidden.contiguous()
    n_valid = count_valid(targets, ignore_index)
    chunk = chunk_size or chunk_rows(n_rows, vocab)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = None
    if need_weight_grad:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = h @ weight.t()  # [rows, V]: the only logits alive at any time
        _check_targets(logits, targets[start:end], ignore_index)
        loss_sum += ce_step(logits, targets[start:end], ignore_index, n_valid).sum()
        g = logits  # now holds d(mean loss)/d(logits) for these rows
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            if g.dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += g.t() @ h
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum / n_valid, grad_hidden, grad_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, ce_step):
        loss, grad_hidden, grad_weight = linear_cross_entropy_forward(
            hidden, weight, targets, ignore_index, ce_step, chunk_size,
            need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1],
        )  # fmt: skip
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("linear cross-entropy backward ran twice (its buffers are reused)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            scale_grad_(grad_hidden, grad_output)
        if grad_weight is not None:
            scale_grad_(grad_weight, grad_output)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Fused linear + cross-entropy with the Triton CE kernel; the full [N, V] logits never
    exist. `chunk_size` rows per chunk (default :func:`chunk_rows`)."""
    if not HAS_TRITON:
        raise RuntimeError("linear_cross_entropy_triton needs the triton package")
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, targets, ignore_index, chunk_size, ce_step_triton
    )


def linear_cross_entropy_chunked_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The same chunked algorithm with the CE step in torch ops (not a reference: it is
    tested against :func:`linear_cross_entropy_reference`; used to measure memory on CPU)."""
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, targets, ignore_index, chunk_size, ce_step_torch
    )


# ------------------------------------------------------------------- ahead-of-time specs

# Vocabulary sizes whose launch configs the build gate compiles (small, GPT-2, Llama-3).
AOT_VOCAB_SIZES = (1000, 32000, 50257, 128256)


def aot_specs(dtype: torch.dtype) -> list:
    """Kernel builds the launchers use for `dtype` logits (with and without gradient)."""
    from .aot import AotSpec, triton_type

    t = triton_type(dtype)
    signature = {"LOGITS": f"*{t}", "GRAD": f"*{t}", "TARGETS": "*i64", "LOSS": "*fp32",
                 "N_VALID": "*fp32", "stride_logits": "i32", "stride_grad": "i32",
                 "n_cols": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr",
                 "WRITE_GRAD": "constexpr"}  # fmt: skip
    specs, seen = [], set()
    for vocab in AOT_VOCAB_SIZES:
        block, num_warps = block_config(vocab)
        for write_grad in (True, False):
            if (block, write_grad) in seen:
                continue
            seen.add((block, write_grad))
            name = f"cross_entropy_fwd_B{block}{'_grad' if write_grad else ''}"
            constexprs = {"BLOCK_V": block, "WRITE_GRAD": write_grad}
            specs.append(AotSpec(name, _cross_entropy_fwd_kernel, signature, constexprs,
                                 num_warps))  # fmt: skip
    return specs
