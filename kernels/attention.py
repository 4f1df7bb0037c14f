"""Causal multi-head attention: FlashAttention-2 style Triton kernels and the torch reference.

Layout: q is [B, H, T, D], k and v are [B, Hkv, T, D] (any strides, e.g. views of a fused
qkv projection) with H a multiple of Hkv: grouped-query attention, where query head h uses
kv head h // (H // Hkv) (the Hugging Face / Llama convention, `repeat_interleave` of the kv
heads); Hkv == H is plain multi-head attention. Head dims 32, 64, 96 and 128 (96 runs in
tiles padded to 128 columns). Optional `lengths` [B] (int, each >= 1) marks the valid
prefix of each sequence in a right-padded batch: keys at positions >= length are masked,
and outputs at query positions >= length are exactly zero (so nothing flows back through
them).

Structure (Liger-Kernel habit): the Triton kernels (in :mod:`._attention_fwd` and
:mod:`._attention_bwd`, where their algorithms are described), then here the plain Python
launchers `attention_forward` / `attention_backward`, their registration as PyTorch custom
ops (``tritonlm::attention``, ``tritonlm::attention_backward``: fake implementations for
torch.compile, an autograd formula that saves tensors and calls the backward op), the
public `attention_triton` (same signature as `attention_reference`; the one place inputs
are validated) and `aot_specs`.

Forward, one program per (query block, batch*query head): online softmax over key blocks,
fp32 accumulation; it saves the log-sum-exp of every row (fp32, base 2) for the backward.
Backward: `delta = rowsum(dO * O)`, then dk/dv (one program per key block and kv head,
summing over the query heads of its group) and dq (one per query block and query head),
both recomputing the probabilities from lse; no atomics, so deterministic.

Worked example of the masks, T = 4, lengths = [2]: query row 1 sees keys {0, 1}; row 0 sees
{0}; rows 2 and 3 are padding, their outputs are 0 and their gradients are 0; keys 2 and 3
receive zero dk/dv.

Packed rows: optional `document_ids` [B, T] (integers) splits each row into documents, a
document being a run of equal consecutive ids (FlashAttention's `cu_seqlens`, written per
position). A query sees only the keys at or before it in its own document. Example:
document_ids = [[7, 7, 3, 3, 3]]: row 1 sees keys {0, 1}, row 2 sees {2}, row 4 sees
{2, 3, 4}. The kernels get the ids as per-position document bounds (`document_bounds`) and
skip every key block that holds no key of a query block's documents. `lengths` still
applies on top (padding may also be written as a document of its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _attention_bwd, _attention_fwd, configs
from ._triton import HAS_TRITON, triton
from .aot_spec import AotSpec
from .attention_configs import (
    OPS,
    SUPPORTED_HEAD_DIMS,
    SWEEP_HEAD_DIMS,
    AttentionConfig,
    KernelConfig,
    attention_config,
    block_d,
)
from .launch import FLOAT_DTYPES, arch, on_device, triton_type

LOG2E = 1.4426950408889634


def group_size(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per kv head, H // Hkv; a ValueError unless Hkv divides H."""
    H, H_kv = q.shape[1], k.shape[1]
    if H_kv < 1 or H % H_kv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv})")
    return H // H_kv


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end), int32 [B, T]: the first position of each position's document and the
    position after its last one; a document is a run of equal consecutive ids.
    [[7, 7, 3, 3, 3]] -> start [[0, 0, 2, 2, 2]], end [[2, 2, 5, 5, 5]]. Pure tensor ops
    (no host sync), so it runs inside a compiled graph on the GPU."""
    B, T = document_ids.shape
    pos = torch.arange(T, device=document_ids.device).expand(B, T)
    if T == 0:
        return (pos.to(torch.int32),) * 2
    change = document_ids[:, 1:] != document_ids[:, :-1]  # a new document at t + 1
    first = torch.ones(B, 1, dtype=torch.bool, device=document_ids.device)
    is_start = torch.cat([first, change], dim=1)
    is_last = torch.cat([change, first], dim=1)
    start = torch.where(is_start, pos, 0).cummax(dim=1).values
    end = torch.where(is_last, pos + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one torch reference (SDPA math, any dtype including float64). Grouped-query
    attention repeats each kv head for the query heads of its group (repeat_interleave),
    so autograd sums dk/dv over the group. Documents: an explicit block-diagonal causal
    mask (key in the query's document and at or before it)."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = group_size(q, k)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if lengths is None and document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    mask = (pos[None, :] <= pos[:, None])[None]  # [1, Tq, Tk]
    if document_ids is not None:
        start, _ = document_bounds(document_ids.to(q.device))
        mask = mask & (pos[None, None, :] >= start[:, :, None])  # key >= its doc's start
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, T]
    mask = mask & valid[:, None, :]  # [B, Tq, Tk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return out * valid[:, None, :, None].to(out.dtype)


# --------------------------------------------------------------------------------------
# Launchers: allocate, pick block sizes, launch. They trust their inputs (attention_triton
# validates them once).
# --------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee", no TF32) for fp32 inputs; for
    fp16/bf16 the option is ignored by triton, "tf32" is its default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for `q` [B, H, T, D]; the launcher fills them, the fake
    implementation returns them as they are (same shapes, dtypes and strides)."""
    B, H, T, D = q.shape
    out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    return out, lse


def _gradient_outputs(
    q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty contiguous (dq [B, H, T, D], dk and dv [B, Hkv, T, D]) in q.dtype (launcher
    and fake, as above)."""
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk, dv = (torch.empty(k.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    return dq, dk, dv


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float | None,
    doc_start: torch.Tensor | None = None,
    doc_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel; return (out [B, H, T, D] in q.dtype, lse [B, H, T] fp32).

    `lengths` is None or int32 [B] on q's device; `doc_start`, `doc_end` None or
    `document_bounds` (int32 [B, T], contiguous, on q's device; the forward reads start).
    `out` is a [B, H, T, D] view of a [B, T, H, D] buffer, so `out.transpose(1, 2)` is
    contiguous (merging heads back needs no copy). `lse` is base 2 (log2 of the softmax
    denominator of the scaled scores times log2(e)); it is only meant for the backward.
    k, v may have fewer heads (H // Hkv query heads per kv head).
    """
    docs = doc_start is not None
    cfg = attention_config(q.shape[-1], q.dtype, docs=docs, arch=arch(q.device)).fwd
    return run_forward(q, k, v, lengths, scale, doc_start, cfg)


def run_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float | None,
    doc_start: torch.Tensor | None,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_forward` with the given tiles (the autotune sweep times each point)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, lse = _forward_outputs(q)
    if out.numel() == 0:
        return out, lse
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    with on_device(q.device):
        _attention_fwd.attn_fwd_kernel[grid](
            q, k, v, out, lse, q if lengths is None else lengths,  # q: an unread dummy
            q if doc_start is None else doc_start,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, T, group, scale * LOG2E,
            HAS_LENS=lengths is not None, HAS_DOCS=doc_start is not None, D=D,
            BLOCK_D=block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            PRECISION=_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float | None,
    doc_start: torch.Tensor | None = None,
    doc_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous, in q.dtype, shaped like q, k, v, from `do` and
    the forward's (`out`, `lse`). Padding query rows and keys >= length get exactly zero;
    dk/dv of a kv head sum over the query heads of its group."""
    grouped = k.shape[1] != q.shape[1]
    cfg = attention_config(q.shape[-1], q.dtype, arch=arch(q.device), grouped=grouped)
    return run_backward(do, q, k, v, out, lse, lengths, scale, doc_start, doc_end, cfg)


def run_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    cfg: AttentionConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_backward` with the given tiles (the autotune sweep times each point)."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group, bd = H // H_kv, block_d(D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    precision = _precision(q.dtype)
    lens, has_lens = (q, False) if lengths is None else (lengths, True)
    has_docs = doc_start is not None
    starts, ends = (doc_start, doc_end) if has_docs else (q, q)  # q: unread dummies
    do = do.to(q.dtype)

    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    dq, dk, dv = _gradient_outputs(q, k)
    if dq.numel() == 0:
        return dq, dk, dv
    pre, kv, qc = cfg.preprocess, cfg.dkdv, cfg.dq
    with on_device(q.device):
        _attention_bwd.attn_bwd_preprocess_kernel[(triton.cdiv(T, pre.block_m), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, T,
            D=D, BLOCK_D=bd, BLOCK_M=pre.block_m, num_warps=pre.num_warps,
            num_stages=pre.num_stages,
        )  # fmt: skip
        _attention_bwd.attn_bwd_dkdv_kernel[(triton.cdiv(T, kv.block_n), B * H_kv)](
            q, k, v, do, dk, dv, lse, delta, lens, starts, ends,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, T, group, scale * LOG2E, scale,
            HAS_LENS=has_lens, HAS_DOCS=has_docs, D=D, BLOCK_D=bd, BLOCK_M=kv.block_m,
            BLOCK_N=kv.block_n, PRECISION=precision, num_warps=kv.num_warps,
            num_stages=kv.num_stages,
        )  # fmt: skip
        _attention_bwd.attn_bwd_dq_kernel[(triton.cdiv(T, qc.block_m), B * H)](
            q, k, v, do, dq, lse, delta, lens, starts,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, T, group, scale * LOG2E, scale,
            HAS_LENS=has_lens, HAS_DOCS=has_docs, D=D, BLOCK_D=bd, BLOCK_M=qc.block_m,
            BLOCK_N=qc.block_n, PRECISION=precision, num_warps=qc.num_warps,
            num_stages=qc.num_stages,
        )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees (opaque operators with fake implementations), and
# the autograd formula (save tensors, call the backward op).
# --------------------------------------------------------------------------------------

_attention_op = torch.library.custom_op("tritonlm::attention", attention_forward, mutates_args=())
_attention_backward_op = torch.library.custom_op(
    "tritonlm::attention_backward", attention_backward, mutates_args=()
)


@_attention_op.register_fake
def _attention_fake(q, k, v, lengths, scale, doc_start=None, doc_end=None):
    return _forward_outputs(q)


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, out, lse, lengths, scale, doc_start=None, doc_end=None):
    return _gradient_outputs(q, k)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, scale, doc_start, doc_end = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, lengths, doc_start, doc_end)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, lengths, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(
        do, q, k, v, out, lse, lengths, ctx.scale, doc_start, doc_end
    )
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------


def _check_inputs(q, k, v, lengths, document_ids=None) -> None:
    if (
        q.dim() != 4
        or k.shape != v.shape
        or k.dim() != 4
        or (k.shape[0], *k.shape[2:]) != (q.shape[0], *q.shape[2:])
    ):
        raise ValueError(
            f"q must be [B, H, T, D] and k, v [B, Hkv, T, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    group_size(q, k)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q, k, v must share a dtype in fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
        )
    if lengths is not None and (
        lengths.dim() != 1
        or lengths.shape[0] != q.shape[0]
        or lengths.dtype.is_floating_point
        or lengths.dtype.is_complex
    ):
        raise ValueError(
            f"lengths must be an integer tensor [B={q.shape[0]}], got {lengths.dtype} "
            f"{tuple(lengths.shape)}"
        )
    if document_ids is not None and (
        tuple(document_ids.shape) != (q.shape[0], q.shape[2])
        or document_ids.dtype.is_floating_point
        or document_ids.dtype.is_complex
    ):
        raise ValueError(
            f"document_ids must be an integer tensor [B={q.shape[0]}, T={q.shape[2]}], got "
            f"{document_ids.dtype} {tuple(document_ids.shape)}"
        )


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with the Triton kernels; same contract as `attention_reference`
    (grouped-query attention and packed documents included).

    The one place the inputs are checked (a ValueError names what is wrong). `lengths` and
    `document_ids` may be any integer dtype on any device; the kernels get int32 on q's
    device (document ids as `document_bounds`).
    """
    if not HAS_TRITON:
        raise RuntimeError("attention_triton needs the triton package")
    _check_inputs(q, k, v, lengths, document_ids)
    if lengths is not None:
        lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    doc_start = doc_end = None
    if document_ids is not None:
        doc_start, doc_end = document_bounds(document_ids.to(q.device))
    scale = None if scale is None else float(scale)
    out, _ = _attention_op(q, k, v, lengths, scale, doc_start, doc_end)
    return out


# --------------------------------------------------------------------------------------
# Ahead-of-time build specs (the build gate compiles exactly the launchers' block sizes)
# --------------------------------------------------------------------------------------


def _spec(name, fn, pointers, strides, ints, floats, constexprs, cfg):
    """An AotSpec whose signature lists every argument of `fn` in order. Last-dim strides
    ("stride_*d") are the constant 1: triton's JIT specializes an int argument equal to 1
    into a constant, so every launch with a contiguous last dim (the model's q/k/v views,
    our own outputs and grads) runs that variant; the generic variant (any stride) would
    report scattered, unvectorized loads that real launches do not have. `ints` maps the
    other int arguments to "i32" or to a constant (GROUP=1: multi-head attention, which
    the JIT specializes the same way)."""
    signature = dict(pointers)
    unit = {n: 1 for n in strides if n.endswith("d")}
    signature |= {n: "constexpr" if n in unit else "i32" for n in strides}
    signature |= {n: "i32" if v == "i32" else "constexpr" for n, v in ints.items()}
    signature |= {n: "fp32" for n in floats}
    signature |= {n: "constexpr" for n in constexprs}
    fixed = {n: v for n, v in ints.items() if v != "i32"}
    return AotSpec(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**unit, **fixed, **constexprs},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _strides(*tensors: str) -> list[str]:
    return [f"stride_{t}{axis}" for t in tensors for axis in "bhtd"]


# Build variants of the kernels that take GROUP and documents: name suffix -> (GROUP,
# HAS_DOCS). "" = multi-head (GROUP the constant 1, as every launch with Hkv == H runs),
# "_gqa" = grouped-query (GROUP any i32), "_docs" / "_docs_gqa" = the same on packed rows.
_VARIANTS = {"": (1, False), "_gqa": ("i32", False), "_docs": (1, True), "_docs_gqa": ("i32", True)}


def kernel_spec(
    kernel: str, D: int, dtype: torch.dtype, cfg: KernelConfig, variant: str = "", tag: str = ""
) -> AotSpec:
    """The AotSpec of one attention kernel ("fwd", "preprocess", "dkdv" or "dq") at head
    dim `D` with tiles `cfg`, in build variant `variant` (a `_VARIANTS` key), on the
    padded-batch path (HAS_LENS=True, a superset of the unpadded one). Named
    ``attention_{fwd|bwd_preprocess|bwd_dkdv|bwd_dq}{variant}_d{D}_{dtype}{tag}``."""
    t = triton_type(dtype)
    bd = block_d(D)
    if kernel == "preprocess":
        return _spec(
            f"attention_bwd_preprocess_d{D}_{t}{tag}", _attention_bwd.attn_bwd_preprocess_kernel,
            {"O": f"*{t}", "DO": f"*{t}", "DELTA": "*fp32"},
            _strides("o", "do"), {"H": "i32", "T": "i32"}, [],
            {"D": D, "BLOCK_D": bd, "BLOCK_M": cfg.block_m}, cfg,
        )  # fmt: skip
    group, docs = _VARIANTS[variant]
    ints = {"H": "i32", "T": "i32", "GROUP": group}
    tiles = {"HAS_LENS": True, "HAS_DOCS": docs, "D": D, "BLOCK_D": bd, "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "PRECISION": _precision(dtype)}  # fmt: skip
    if kernel == "fwd":
        return _spec(
            f"attention_fwd{variant}_d{D}_{t}{tag}", _attention_fwd.attn_fwd_kernel,
            {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{t}", "LSE": "*fp32",
             "LENS": "*i32", "DOC_START": "*i32"},
            _strides("q", "k", "v", "o"), ints, ["qk_scale"], tiles, cfg,
        )  # fmt: skip
    fn, outs, bounds = {
        "dkdv": (_attention_bwd.attn_bwd_dkdv_kernel, ["DK", "DV"], ["DOC_START", "DOC_END"]),
        "dq": (_attention_bwd.attn_bwd_dq_kernel, ["DQ"], ["DOC_START"]),
    }[kernel]
    names = ["Q", "K", "V", "DO", *outs]
    pointers = {n: f"*{t}" for n in names}
    pointers |= {"LSE": "*fp32", "DELTA": "*fp32", "LENS": "*i32"}
    pointers |= {n: "*i32" for n in bounds}
    strides = _strides(*(n.lower() for n in names))
    return _spec(
        f"attention_bwd_{kernel}{variant}_d{D}_{t}{tag}", fn, pointers, strides, ints,
        ["qk_scale", "sm_scale"], tiles, cfg,
    )  # fmt: skip


def _tag(cfg: KernelConfig) -> str:
    return f"_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """AotSpecs of every attention kernel (forward, preprocess, dk/dv, dq) for every
    supported head dim with the tiles `attention_config` gives inputs of `dtype` on every
    arch of the table; forward, dk/dv and dq in every `_VARIANTS` entry (multi-head or
    grouped-query, with or without documents). The "default" arch's builds have plain
    names; another arch's tiles, where they differ, add a build named with their tiles."""
    specs: dict[str, AotSpec] = {}
    plain: dict[tuple, KernelConfig] = {}
    for arch_key in configs.table_archs():  # "default" first
        for D in SUPPORTED_HEAD_DIMS:
            cfg = attention_config(D, dtype, arch=arch_key)
            packed = attention_config(D, dtype, docs=True, arch=arch_key)
            gqa_dkdv = attention_config(D, dtype, arch=arch_key, grouped=True).dkdv
            jobs = [("preprocess", "", cfg.preprocess)]
            for variant, (group, docs) in _VARIANTS.items():
                dkdv = cfg.dkdv if group == 1 else gqa_dkdv
                jobs += [("fwd", variant, packed.fwd if docs else cfg.fwd),
                         ("dkdv", variant, dkdv), ("dq", variant, cfg.dq)]  # fmt: skip
            for kernel, variant, c in jobs:
                first = plain.setdefault((kernel, variant, D), c)
                spec = kernel_spec(kernel, D, dtype, c, variant, "" if c == first else _tag(c))
                specs[spec.name] = spec
    return list(specs.values())


def sweep_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Builds of every point of the autotune sweep space (configs.SWEEP_SPACE) of the
    multi-head forward, packed forward, dk/dv and dq at the head dims the autotune tunes
    (SWEEP_HEAD_DIMS: the "d64" and "d128" classes; "d32" keeps the shipped tiles)."""
    specs = []
    for D in SWEEP_HEAD_DIMS:
        for op in OPS:
            kernel = op.removeprefix("attention_").removesuffix("_docs")
            variant = "_docs" if op.endswith("_docs") else ""
            for point in configs.sweep(op, block_d(D)):
                cfg = KernelConfig.of(point)
                specs.append(kernel_spec(kernel, D, dtype, cfg, variant, _tag(cfg)))
    return specs
