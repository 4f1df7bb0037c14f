"""Causal multi-head attention: FlashAttention-2 style Triton kernels and the torch reference.

Layout: q, k, v are [B, H, T, D] (any strides, e.g. views of a fused qkv projection).
Optional `lengths` [B] (int, each >= 1) marks the valid prefix of each sequence in a
right-padded batch: keys at positions >= length are masked, and outputs at query positions
>= length are exactly zero (so nothing flows back through them).

Structure (Liger-Kernel habit): the Triton kernels first, then the plain Python launchers
`attention_forward` / `attention_backward`, then a thin `torch.autograd.Function`, then the
public `attention_triton` (same signature as `attention_reference`) and `aot_specs`.

Forward, one program per (query block, batch*head): online softmax over key blocks in
base 2 (scores are pre-multiplied by scale*log2(e)), fp32 accumulation, key blocks above
the diagonal or past the sequence length are never visited; key blocks entirely below the
diagonal and inside the length run without masks. It saves the log-sum-exp of every row
(fp32, base 2) for the backward pass.

Backward: `delta = rowsum(dO * O)` (preprocess kernel); dk/dv with one program per key
block looping over the query blocks from the diagonal down to the length; dq with a
separate program per query block looping over key blocks (no atomics: deterministic).
Both recompute P = exp2(S - lse) block by block.

Worked example of the masks, T = 4, lengths = [2]: query row 1 sees keys {0, 1}; row 0 sees
{0}; rows 2 and 3 are padding, their outputs are 0 and their gradients are 0; keys 2 and 3
receive zero dk/dv.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The one torch reference (SDPA math, any dtype including float64)."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, T]
    mask = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # [B, Tq, Tk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return out * valid[:, None, :, None].to(out.dtype)


# --------------------------------------------------------------------------------------
# Block sizes: the one place the launchers AND the AOT build gate take them from.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    preprocess: KernelConfig  # block_n unused
    dkdv: KernelConfig
    dq: KernelConfig


def attention_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Block sizes for `head_dim` and `dtype`.

    Every tile dimension is >= 16 (tl.dot on tensor cores). Forward and dq hold a
    [block_m, D] fp32 accumulator and dk/dv two [block_n, D] ones, so wide heads get more
    warps / smaller tiles. fp32 inputs use exact ("ieee") dots, which run on CUDA cores
    (FMA) with far more registers per tile: small 32x32 tiles, 2 stages. Every choice
    compiles without register spills for sm_80 and sm_90 in fp16/bf16 (fp32: at most a
    few bytes), see `aot_specs` and the build gate.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}"
        )
    preprocess = KernelConfig(64, 16, 4, 1)
    if dtype == torch.float32:
        wide = 8 if head_dim == 128 else 4
        fwd = KernelConfig(32, 32, 4, 2)
        dkdv = KernelConfig(32, 32, wide, 2)
        dq = KernelConfig(32, 32, wide, 2)
        return AttentionConfig(fwd=fwd, preprocess=preprocess, dkdv=dkdv, dq=dq)
    warps = 4 if head_dim <= 32 else 8
    fwd = KernelConfig(128, 64, 8 if head_dim == 128 else 4, 3)
    dkdv = KernelConfig(32, 64 if head_dim == 128 else 128, warps, 3)
    dq = KernelConfig(64 if head_dim == 128 else 128, 32, warps, 3)
    return AttentionConfig(fwd=fwd, preprocess=preprocess, dkdv=dkdv, dq=dq)


if HAS_TRITON:
    # ----------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------

    @triton.jit
    def _attn_fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        L,
        lo,
        hi,
        qk_scale,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Online softmax over key blocks [lo, hi); MASKED adds the causal/length mask."""
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
            v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
            if MASKED:
                key_ok = offs_n < L
                kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if MASKED:
                keep = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
                s = tl.where(keep, s, float("-inf"))
            # Every row sees key 0 in the first block it visits, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        LENS,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_od,
        H,
        T,
        qk_scale,
        HAS_LENS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Heaviest (last) query blocks first: better tail balance under causality.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        m_lo = pid_m * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Keys [0, full_hi): below the diagonal for every row of the block and < L.
        # Keys [full_hi, hi): the diagonal / length tail, masked. Blocks past L: no work.
        live = m_lo < L
        hi = tl.where(live, tl.minimum(m_lo + BLOCK_M, L), 0)
        full_hi = tl.where(live, (tl.minimum(m_lo, L) // BLOCK_N) * BLOCK_N, 0)
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, L, 0, full_hi, qk_scale, D, BLOCK_N, False, PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, L, full_hi, hi, qk_scale, D, BLOCK_N, True, PRECISION,
        )  # fmt: skip

        has_mass = l_i > 0.0
        l_safe = tl.where(has_mass, l_i, 1.0)
        out = acc / l_safe[:, None]
        out = tl.where((offs_m < L)[:, None], out, 0.0)
        lse = tl.where(has_mass, m_i + tl.log2(l_safe), 0.0)
        o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    # ----------------------------------------------------------------------------------
    # Backward
    # ----------------------------------------------------------------------------------

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O,
        DO,
        DELTA,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_od,
        stride_dob,
        stride_doh,
        stride_dot,
        stride_dod,
        H,
        T,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """delta[row] = sum_d dO[row, d] * O[row, d] in fp32 (0 on padding rows: O = 0)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m[:, None] < T
        o_ptrs = (
            O
            + b.to(tl.int64) * stride_ob
            + h.to(tl.int64) * stride_oh
            + offs_m[:, None] * stride_ot
            + offs_d[None, :] * stride_od
        )
        do_ptrs = (
            DO
            + b.to(tl.int64) * stride_dob
            + h.to(tl.int64) * stride_doh
            + offs_m[:, None] * stride_dot
            + offs_d[None, :] * stride_dod
        )
        o = tl.load(o_ptrs, mask=row_ok, other=0.0).to(tl.float32)
        do = tl.load(do_ptrs, mask=row_ok, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)

    @triton.jit
    def _attn_bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qt,
        stride_qd,
        stride_dot,
        stride_dod,
        offs_n,
        L,
        lo,
        hi,
        qk_scale,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASKED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Accumulate dk (unscaled) and dv of one key block over query blocks [lo, hi)."""
        offs_d = tl.arange(0, D)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd
            do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
            if MASKED:
                row_ok = offs_m < L
                qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            else:
                qt = tl.load(qt_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            if MASKED:
                keep = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :]
                st = tl.where(keep, st, float("-inf"))
            pt = tl.exp2(st - lse[None, :])
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        LSE,
        DELTA,
        LENS,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dot,
        stride_dod,
        stride_dkb,
        stride_dkh,
        stride_dkt,
        stride_dkd,
        stride_dvb,
        stride_dvh,
        stride_dvt,
        stride_dvd,
        H,
        T,
        qk_scale,
        sm_scale,
        HAS_LENS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        n_lo = pid_n * BLOCK_N
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        key_in = offs_n[:, None] < T
        k_ptrs = K + b64 * stride_kb + h64 * stride_kh
        k = tl.load(
            k_ptrs + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
            mask=key_in,
            other=0.0,
        )
        v_ptrs = V + b64 * stride_vb + h64 * stride_vh
        v = tl.load(
            v_ptrs + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=key_in,
            other=0.0,
        )
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_dob + h64 * stride_doh
        lse_base = LSE + pid_bh.to(tl.int64) * T
        delta_base = DELTA + pid_bh.to(tl.int64) * T

        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # Query rows that see this key block: [n_lo, L). Split into blocks of BLOCK_M:
        #   [m_start, diag_end)            straddle the diagonal -> masked
        #   [diag_end, full_end)           every key <= row, every row < L -> unmasked
        #   [max(diag_end, full_end), L)   the length tail -> masked
        # Keys >= L still get values here; they are zeroed on the store below.
        m_start = (n_lo // BLOCK_M) * BLOCK_M
        m_end = tl.where(n_lo < L, L, 0)
        diag_end = ((n_lo + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        full_end = (L // BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
            stride_dot, stride_dod, offs_n, L, m_start, tl.minimum(diag_end, m_end),
            qk_scale, D, BLOCK_M, True, PRECISION,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
            stride_dot, stride_dod, offs_n, L, diag_end, full_end,
            qk_scale, D, BLOCK_M, False, PRECISION,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
            stride_dot, stride_dod, offs_n, L, tl.maximum(diag_end, full_end), m_end,
            qk_scale, D, BLOCK_M, True, PRECISION,
        )  # fmt: skip

        key_ok = (offs_n < L)[:, None]
        dk = tl.where(key_ok, dk * sm_scale, 0.0)
        dv = tl.where(key_ok, dv, 0.0)
        dk_ptrs = DK + b64 * stride_dkb + h64 * stride_dkh
        dk_ptrs += offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b64 * stride_dvb + h64 * stride_dvh
        dv_ptrs += offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=key_in)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_in)

    @triton.jit
    def _attn_bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        L,
        lo,
        hi,
        qk_scale,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Accumulate dq (unscaled) of one query block over key blocks [lo, hi)."""
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
            vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
            if MASKED:
                key_ok = offs_n < L
                kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)
                vt = tl.load(vt_ptrs, mask=key_ok[None, :], other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                vt = tl.load(vt_ptrs)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            if MASKED:
                keep = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
        LENS,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dot,
        stride_dod,
        stride_dqb,
        stride_dqh,
        stride_dqt,
        stride_dqd,
        H,
        T,
        qk_scale,
        sm_scale,
        HAS_LENS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        m_lo = pid_m * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        row_in = offs_m < T
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh
        q = tl.load(
            q_ptrs + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
            mask=row_in[:, None],
            other=0.0,
        )
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh
        do = tl.load(
            do_ptrs + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
            mask=row_in[:, None],
            other=0.0,
        )
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
        k_base = K + b64 * stride_kb + h64 * stride_kh
        v_base = V + b64 * stride_vb + h64 * stride_vh

        dq = tl.zeros([BLOCK_M, D], tl.float32)
        live = m_lo < L
        hi = tl.where(live, tl.minimum(m_lo + BLOCK_M, L), 0)
        full_hi = tl.where(live, (tl.minimum(m_lo, L) // BLOCK_N) * BLOCK_N, 0)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, offs_m, L, 0, full_hi, qk_scale, D, BLOCK_N, False, PRECISION,
        )  # fmt: skip
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, offs_m, L, full_hi, hi, qk_scale, D, BLOCK_N, True, PRECISION,
        )  # fmt: skip

        dq = tl.where((offs_m < L)[:, None], dq * sm_scale, 0.0)
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh
        dq_ptrs += offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_in[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee", no TF32) for fp32 inputs; for
    fp16/bf16 the option is ignored by triton, "tf32" is its default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, lengths):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        raise ValueError(f"q, k, v must share a dtype in fp32/fp16/bf16; got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
        )
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != q.shape[0]):
        raise ValueError(f"lengths must be [B={q.shape[0]}], got {tuple(lengths.shape)}")


def _lengths_arg(lengths: torch.Tensor | None, q: torch.Tensor):
    """(tensor passed as LENS, HAS_LENS); a dummy pointer when there are no lengths."""
    if lengths is None:
        return q, False
    return lengths.to(device=q.device, dtype=torch.int32).contiguous(), True


def _on_device(t: torch.Tensor):
    """Launch on `t`'s GPU (triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel; return (out [B, H, T, D] in q.dtype, lse [B, H, T] fp32).

    `out` is a [B, H, T, D] view of a [B, T, H, D] buffer, so `out.transpose(1, 2)` is
    contiguous (merging heads back needs no copy). `lse` is base 2 (log2 of the softmax
    denominator of the scaled scores times log2(e)); it is only meant for the backward.
    """
    _check_inputs(q, k, v, lengths)
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = attention_config(D, q.dtype).fwd
    out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    lens, has_lens = _lengths_arg(lengths, q)
    if out.numel() == 0:
        return out, lse
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    with _on_device(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, lens,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, T, scale * LOG2E,
            HAS_LENS=has_lens, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            PRECISION=_precision(q.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous, in q.dtype, from `do` and the forward's
    (`out`, `lse`). Padding query rows and keys >= length get exactly zero."""
    _check_inputs(q, k, v, lengths)
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = attention_config(D, q.dtype)
    precision = _precision(q.dtype)
    lens, has_lens = _lengths_arg(lengths, q)
    do = do.to(q.dtype)

    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    dq = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    dv = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    if dq.numel() == 0:
        return dq, dk, dv
    pre, kv, qc = cfg.preprocess, cfg.dkdv, cfg.dq
    with _on_device(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(T, pre.block_m), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, T,
            D=D, BLOCK_M=pre.block_m, num_warps=pre.num_warps, num_stages=pre.num_stages,
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, kv.block_n), B * H)](
            q, k, v, do, dk, dv, lse, delta, lens,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, T, scale * LOG2E, scale,
            HAS_LENS=has_lens, D=D, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n,
            PRECISION=precision, num_warps=kv.num_warps, num_stages=kv.num_stages,
        )  # fmt: skip
        _attn_bwd_dq_kernel[(triton.cdiv(T, qc.block_m), B * H)](
            q, k, v, do, dq, lse, delta, lens,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, T, scale * LOG2E, scale,
            HAS_LENS=has_lens, D=D, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n,
            PRECISION=precision, num_warps=qc.num_warps, num_stages=qc.num_stages,
        )  # fmt: skip
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, scale):
        out, lse = attention_forward(q, k, v, lengths, scale)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, lengths, ctx.scale)
        return dq, dk, dv, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention with the Triton kernels; same contract as `attention_reference`."""
    if not HAS_TRITON:
        raise RuntimeError("attention_triton needs the triton package")
    _check_inputs(q, k, v, lengths)
    if lengths is not None:
        lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    return _AttentionFunction.apply(q, k, v, lengths, scale)


# --------------------------------------------------------------------------------------
# Ahead-of-time build specs (the build gate compiles exactly the launchers' block sizes)
# --------------------------------------------------------------------------------------


def _spec(name, fn, pointers, strides, floats, constexprs, cfg):
    """An AotSpec whose signature lists every argument of `fn` in order. Last-dim strides
    ("stride_*d") are the constant 1: triton's JIT specializes an int argument equal to 1
    into a constant, so every launch with a contiguous last dim (the model's q/k/v views,
    our own outputs and grads) runs that variant; the generic variant (any stride) would
    report scattered, unvectorized loads that real launches do not have."""
    from .aot import AotSpec

    signature = dict(pointers)
    unit = {n: 1 for n in strides if n.endswith("d")}
    signature |= {n: "constexpr" if n in unit else "i32" for n in strides + ["H", "T"]}
    signature |= {n: "fp32" for n in floats}
    signature |= {n: "constexpr" for n in constexprs}
    return AotSpec(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**unit, **constexprs},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _strides(*tensors: str) -> list[str]:
    return [f"stride_{t}{axis}" for t in tensors for axis in "bhtd"]


def aot_specs(dtype: torch.dtype) -> list:
    """One AotSpec per attention kernel (forward, preprocess, dk/dv, dq) and supported
    head dim, with `attention_config`'s block sizes for inputs of `dtype`, on the
    padded-batch path (HAS_LENS=True, a superset of the unpadded one)."""
    t = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    precision = _precision(dtype)
    specs = []
    for D in SUPPORTED_HEAD_DIMS:
        cfg = attention_config(D, dtype)

        def tiles(c, D=D):
            return {
                "HAS_LENS": True,
                "D": D,
                "BLOCK_M": c.block_m,
                "BLOCK_N": c.block_n,
                "PRECISION": precision,
            }

        specs.append(_spec(
            f"attention_fwd_d{D}_{t}", _attn_fwd_kernel,
            {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{t}", "LSE": "*fp32",
             "LENS": "*i32"},
            _strides("q", "k", "v", "o"), ["qk_scale"], tiles(cfg.fwd), cfg.fwd,
        ))  # fmt: skip
        specs.append(_spec(
            f"attention_bwd_preprocess_d{D}_{t}", _attn_bwd_preprocess_kernel,
            {"O": f"*{t}", "DO": f"*{t}", "DELTA": "*fp32"},
            _strides("o", "do"), [], {"D": D, "BLOCK_M": cfg.preprocess.block_m},
            cfg.preprocess,
        ))  # fmt: skip
        for kernel, fn, c, outs in (
            ("dkdv", _attn_bwd_dkdv_kernel, cfg.dkdv, ["DK", "DV"]),
            ("dq", _attn_bwd_dq_kernel, cfg.dq, ["DQ"]),
        ):
            names = ["Q", "K", "V", "DO", *outs]
            pointers = {n: f"*{t}" for n in names}
            pointers |= {"LSE": "*fp32", "DELTA": "*fp32", "LENS": "*i32"}
            strides = _strides(*(n.lower() for n in names))
            specs.append(_spec(
                f"attention_bwd_{kernel}_d{D}_{t}", fn, pointers, strides,
                ["qk_scale", "sm_scale"], tiles(c), c,
            ))  # fmt: skip
    return specs
