"""Softmax cross-entropy over the vocabulary, and fused linear + cross-entropy.

Loss is the mean over targets that are not `ignore_index`; when every target is ignored
the loss is 0 and all gradients are 0 (torch's own function would return NaN).

Layout (Liger-Kernel habit): torch references, Triton kernel, plain Python launchers,
their registration as PyTorch custom ops (``tritonlm::cross_entropy``,
``tritonlm::linear_cross_entropy``: fake implementations for torch.compile and an autograd
formula), then the public functions, the one place inputs are validated.

Cross-entropy kernel: one program per row. Pass 1 streams the row in BLOCK_V blocks with
an online logsumexp (running max m and running sum d of exp(x - m), rescaled whenever m
grows), so no block ever exponentiates a large positive number and logits of 1e4 are fine.
Pass 2 writes the gradient of the *mean* loss, (softmax - onehot) / n_valid, already in the
forward pass, into a fresh buffer of the logits' dtype that the op returns as a second
output (saved for backward; only when the logits need a gradient). The backward then only
returns that buffer times grad_output. It is a new tensor, not a scaling in place: the
saved buffer is an output of the op, and an op seen by torch.compile may not modify its
outputs later. The saved buffer is freed with the graph after the backward.

Fused linear + cross-entropy processes tokens in chunks: per chunk, logits = h @ W.T, the
CE step writes the gradient into those chunk logits in place, then grad_h[chunk] = g @ W
and grad_W += g.T @ h (fp32 accumulator). All of that happens in the forward pass; the
backward scales the saved gradients (out of place, as above). The chunk rule
(:func:`chunk_rows`) takes the fewest chunks whose logits fit the config table's
``chunk_elements`` (2**27 on a GPU by default: 256 MiB in bf16), then spreads the rows
evenly over them: every grad_W update reads and writes the whole fp32 accumulator, so
few fat chunks beat many skinny ones (Liger's rule gives 256-row chunks at V=128256).
"""

from __future__ import annotations

import torch

from . import configs
from ._triton import HAS_TRITON, tl, triton
from .aot_spec import AotSpec
from .launch import FLOAT_DTYPES, arch, on_device, triton_type


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


# Largest number of logits one chunk of the fused linear cross-entropy holds when the
# config table says nothing (the table's value is used: see configs.DEFAULTS).
LOGITS_CHUNK_ELEMENTS = configs.DEFAULTS["linear_cross_entropy"]["chunk_elements"]

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
# Plain Python: allocate, pick block sizes, launch. They trust their inputs (the public
# functions validate them once).


def launch_config(n_cols: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """{"block_v", "num_warps"} for a vocabulary of `n_cols`, from the config table; the
    block is never wider than the vocabulary rounded up to a power of two.

    Example (shipped table): 100 -> block_v 128, 4 warps; 50257 -> block_v 4096, 8 warps.
    """
    cfg = configs.lookup("cross_entropy", arch(device), dtype,
                         configs.cross_entropy_class(n_cols))  # fmt: skip
    block = min(triton.next_power_of_2(max(n_cols, 1)), cfg["block_v"])
    return {"block_v": block, "num_warps": cfg["num_warps"]}


def count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored targets as a float32 tensor on the targets' device, at least
    1 (so an all-ignored batch gives loss 0 and gradients 0). No host sync."""
    return (targets != ignore_index).sum().clamp_min(1).to(torch.float32)


def _no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What an op returns in a gradient's place when none was asked for (ops return
    tensors, never None)."""
    return torch.empty((0,), dtype=like.dtype, device=like.device)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    n_valid: torch.Tensor,
    grad: torch.Tensor | None,
    cfg: dict | None = None,
) -> torch.Tensor:
    """Launch the kernel: per-row losses [N] fp32 (0 where ignored). If `grad` is given
    ([N, V], may be `logits` itself) it receives (softmax - onehot) / n_valid. `logits` and
    `grad` need a contiguous last dimension."""
    n_rows, n_cols = logits.shape
    losses = torch.empty((n_rows,), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return losses
    cfg = cfg or launch_config(n_cols, logits.dtype, logits.device)
    write_grad = grad is not None
    g = grad if write_grad else logits  # never written when WRITE_GRAD is False
    with on_device(logits.device):
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits, g, targets.contiguous(), losses, n_valid, logits.stride(0), g.stride(0),
            n_cols, ignore_index, BLOCK_V=cfg["block_v"], WRITE_GRAD=write_grad,
            num_warps=cfg["num_warps"],
        )  # fmt: skip
    return losses


def cross_entropy_forward(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss fp32 scalar, gradient of that loss w.r.t. logits, contiguous [N, V]);
    the gradient is an empty [0] tensor when `compute_grad` is False."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_valid = count_valid(targets, ignore_index)
    grad = None
    if compute_grad:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    losses = cross_entropy_rows(logits, targets, ignore_index, n_valid, grad)
    return losses.sum() / n_valid, _no_grad_placeholder(logits) if grad is None else grad


def chunk_rows(
    n_rows: int, vocab: int, budget: int = LOGITS_CHUNK_ELEMENTS, min_rows: int = 1
) -> int:
    """Rows per chunk: the fewest chunks whose logits hold at most `budget` elements (but
    at least `min_rows` rows), the rows spread evenly over them and rounded up to a
    multiple of 16 where that stays within the budget.

    Example (budget 2**27): chunk_rows(8192, 128256) -> 1024 (8 chunks);
    chunk_rows(16384, 50257) -> 2352 (7 chunks); chunk_rows(100, 32000) -> 100.
    """
    cap = max(1, min_rows, budget // max(vocab, 1))
    if cap >= n_rows:
        return max(1, n_rows)
    chunks = -(-n_rows // cap)
    rows = -(-n_rows // chunks)
    rounded = -(-rows // 16) * 16
    return rounded if rounded <= cap else rows


def default_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """:func:`chunk_rows` with the config table's budget for this device and dtype."""
    cfg = configs.lookup("linear_cross_entropy", arch(device), dtype, "any")
    return chunk_rows(n_rows, vocab, cfg["chunk_elements"], cfg["min_chunk_rows"])


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


# The chunk loop's CE step, by the name the linear cross-entropy op takes.
CE_STEPS = {"triton": ce_step_triton, "torch": ce_step_torch}


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_size: int | None,
    ce_step: str,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss fp32, grad_hidden, grad_weight), chunk by chunk with the CE step
    ``CE_STEPS[ce_step]``; a gradient not asked for is an empty [0] tensor."""
    step = CE_STEPS[ce_step]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    hidden = hidden.contiguous()
    n_valid = count_valid(targets, ignore_index)
    if chunk_size is None:
        chunk = default_chunk_rows(n_rows, vocab, hidden.dtype, hidden.device)
    else:
        chunk = chunk_size
    grad_hidden = _no_grad_placeholder(hidden)
    if need_hidden_grad:
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = _no_grad_placeholder(weight)
    if need_weight_grad:  # accumulated over chunks in fp32
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = h @ weight.t()  # [rows, V]: the only logits alive at any time
        loss_sum += step(logits, targets[start:end], ignore_index, n_valid).sum()
        g = logits  # now holds d(mean loss)/d(logits) for these rows
        if need_hidden_grad:
            torch.mm(g, weight, out=grad_hidden[start:end])
        if need_weight_grad:
            if g.dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += g.t() @ h
    return loss_sum / n_valid, grad_hidden, grad_weight.to(weight.dtype)


# ---------------------------------------------- custom ops (what torch.compile sees)
# Each forward launcher becomes an opaque "tritonlm::" operator. Its outputs include the
# gradients it computed; the fake implementations give their shapes for tracing. The
# autograd formulas save those gradients and scale them by grad_output in backward.

_cross_entropy_op = torch.library.custom_op(
    "tritonlm::cross_entropy", cross_entropy_forward, mutates_args=()
)
_linear_cross_entropy_op = torch.library.custom_op(
    "tritonlm::linear_cross_entropy", linear_cross_entropy_forward, mutates_args=()
)


def _fake_grad(like: torch.Tensor, needed: bool) -> torch.Tensor:
    if not needed:
        return _no_grad_placeholder(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, targets, ignore_index, compute_grad):
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    return loss, _fake_grad(logits, compute_grad)


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(
    hidden, weight, targets, ignore_index, chunk_size, ce_step, need_hidden_grad,
    need_weight_grad,
):  # fmt: skip
    loss = torch.empty((), dtype=torch.float32, device=hidden.device)
    return loss, _fake_grad(hidden, need_hidden_grad), _fake_grad(weight, need_weight_grad)


def _save_gradients(ctx, inputs, output):
    """Shared setup_context: save the gradient outputs (not differentiable themselves;
    no zero gradients are materialized for them in backward)."""
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    return grad * grad_output.to(grad.dtype)


def _cross_entropy_backward(ctx, grad_loss, _dgrad):
    (grad,) = ctx.saved_tensors
    return _scaled(grad, grad_loss), None, None, None


def _linear_cross_entropy_backward(ctx, grad_loss, _dhidden, _dweight):
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = _scaled(grad_hidden, grad_loss) if ctx.needs_input_grad[0] else None
    dw = _scaled(grad_weight, grad_loss) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_save_gradients)
_linear_cross_entropy_op.register_autograd(
    _linear_cross_entropy_backward, setup_context=_save_gradients
)


# ----------------------------------------------------------------------- public entries


def _check_targets(
    targets: torch.Tensor, n_rows: int, vocab: int, ignore_index: int, device: torch.device
) -> None:
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must be [N={n_rows}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device}, the inputs on {device}")
    # Values are checked only where that is free: not for CUDA targets (it would wait for
    # the device) and not while torch.compile traces (a data-dependent branch breaks the
    # graph). An out-of-range target would read outside its logits row.
    if targets.is_cuda or torch.compiler.is_compiling() or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab}) or {ignore_index}")


def cross_entropy_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy through the Triton kernel (contract of the reference)."""
    if not HAS_TRITON:
        raise RuntimeError("cross_entropy_triton needs the triton package")
    if logits.dim() != 2:
        raise ValueError(f"expected logits [N, V], got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    _check_targets(targets, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_op(logits, targets, int(ignore_index), compute_grad)
    return loss


def _linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size, ce_step):
    """Validate, then run the chunked op with the CE step named `ce_step`."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The projection runs in the autocast dtype, as nn.Linear (and the reference's
        # matmul) would; fp32 inputs, e.g. a model's fp32 residual stream, are cast here
        # so that every matmul of the chunk loop sees one dtype.
        amp_dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"hidden and weight must share a dtype in float32/float16/bfloat16, got "
            f"{hidden.dtype} and {weight.dtype}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    grad = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_op(
        hidden, weight, targets, int(ignore_index), chunk_size, ce_step,
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )  # fmt: skip
    return loss


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Fused linear + cross-entropy with the Triton CE kernel; the full [N, V] logits never
    exist. `chunk_size` rows per chunk (default :func:`default_chunk_rows`)."""
    if not HAS_TRITON:
        raise RuntimeError("linear_cross_entropy_triton needs the triton package")
    return _linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size, "triton")


def linear_cross_entropy_chunked_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The same chunked algorithm with the CE step in torch ops (not a reference: it is
    tested against :func:`linear_cross_entropy_reference`; used to measure memory on CPU)."""
    return _linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size, "torch")


# ------------------------------------------------------------------- ahead-of-time specs

# Vocabulary sizes whose launch configs the build gate compiles (small, GPT-2, Llama-3).
AOT_VOCAB_SIZES = (1000, 32000, 50257, 128256)


def _spec(dtype: torch.dtype, block_v: int, num_warps: int, write_grad: bool) -> AotSpec:
    t = triton_type(dtype)
    signature = {"LOGITS": f"*{t}", "GRAD": f"*{t}", "TARGETS": "*i64", "LOSS": "*fp32",
                 "N_VALID": "*fp32", "stride_logits": "i32", "stride_grad": "i32",
                 "n_cols": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr",
                 "WRITE_GRAD": "constexpr"}  # fmt: skip
    name = f"cross_entropy_fwd_B{block_v}_w{num_warps}{'_grad' if write_grad else ''}_{t}"
    constexprs = {"BLOCK_V": block_v, "WRITE_GRAD": write_grad}
    return AotSpec(name, _cross_entropy_fwd_kernel, signature, constexprs, num_warps)


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Kernel builds of the table's configs for `dtype` logits at AOT_VOCAB_SIZES, for
    every arch in the table, with and without the gradient."""
    specs = {}
    for vocab in AOT_VOCAB_SIZES:
        for arch_key in configs.table_archs():
            cfg = configs.lookup("cross_entropy", arch_key, dtype,
                                 configs.cross_entropy_class(vocab))  # fmt: skip
            block = min(triton.next_power_of_2(vocab), cfg["block_v"])
            for write_grad in (True, False):
                spec = _spec(dtype, block, cfg["num_warps"], write_grad)
                specs[spec.name] = spec
    return list(specs.values())


def sweep_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Kernel builds of every point of the autotune sweep space (large vocabularies)."""
    return [
        _spec(dtype, cfg["block_v"], cfg["num_warps"], write_grad)
        for cfg in configs.sweep("cross_entropy")
        for write_grad in (True, False)
    ]
