"""Forward Triton kernel of causal attention (launched by :mod:`.attention`).

One program per (query block, batch*query head). Grouped-query attention: query head h
reads key/value head h // GROUP (GROUP = query heads per kv head, 1 for plain multi-head
attention). Head dims that are not a power of two (96) run in tiles of BLOCK_D columns
(the next power of two) whose columns >= D load as 0 and are never stored; `load_tile`
is the one place those masks are added, and for D == BLOCK_D it emits the plain loads.

Online softmax over key blocks in base 2: the scores are pre-multiplied by
qk_scale = scale * log2(e), so exp2/log2 replace exp/log. For each query row it keeps the
running max m, the running sum l of exp2(s - m) and the fp32 accumulator
acc = sum exp2(s - m) * v; when a new key block raises m, l and acc are rescaled by
exp2(m_old - m_new). The output is acc / l and the saved logsumexp is m + log2(l)
(base 2), which is all the backward needs to recompute the probabilities.

Key blocks visited by the query block [m_lo, m_lo + BLOCK_M) of a sequence of length L:
    [0, full_hi)   entirely below the diagonal and inside L: no mask at all
    [full_hi, hi)  the diagonal block(s) and the length tail: causal and length mask
    [hi, T)        above the diagonal or past L: never loaded
A query block that starts at or past L (padding) visits nothing and stores zeros.

Packed rows (HAS_DOCS): DOC_START [B, T] holds, for each position, the first position of
its document (a run of equal document ids), so row r sees keys [start[r], r]. Starts never
decrease along a row, so a query block's documents occupy keys [start[m_lo], last row]:
key blocks below start[m_lo] hold no key of them and are never loaded (the loop starts at
lo = start[m_lo] rounded down to a key block). Key blocks entirely in
[start[last row], m_lo) are seen by every row of the block: no mask. So
    [lo, full_lo)    masked (some row's document starts inside or after them)
    [full_lo, full_hi) unmasked
    [full_hi, hi)    masked (the diagonal and the length tail)
where full_lo is start[last row] rounded up. With many short documents in one query
block, a masked key block can leave a row with no visible key yet; the running max starts
at a finite -1e30 instead of -inf, so such a row's update is exp2(0) = 1 and p = 0, no NaN.
"""

from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def load_tile(ptrs, mask, d_mask, MASKED: tl.constexpr, PAD_D: tl.constexpr):
        """Load a tile whose one axis is the head dim, 0 where masked: `mask` (rows or
        keys) applies when MASKED, `d_mask` (head-dim columns < D) when PAD_D. Shared by
        the backward kernels; constexpr branches, so an unpadded unmasked tile is a plain
        vectorized load."""
        if MASKED:
            if PAD_D:
                x = tl.load(ptrs, mask=mask & d_mask, other=0.0)
            else:
                x = tl.load(ptrs, mask=mask, other=0.0)
        else:
            if PAD_D:
                x = tl.load(ptrs, mask=d_mask, other=0.0)
            else:
                x = tl.load(ptrs)
        return x

    @triton.jit
    def store_tile(ptrs, x, mask, d_mask, PAD_D: tl.constexpr):
        """Store a [rows, head dim] tile where `mask` (and, when PAD_D, `d_mask`) holds."""
        if PAD_D:
            tl.store(ptrs, x, mask=mask & d_mask)
        else:
            tl.store(ptrs, x, mask=mask)

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
        row_start,
        L,
        lo,
        hi,
        qk_scale,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Online softmax over key blocks [lo, hi); MASKED adds the causal/length mask and,
        when DOCS, the document mask (key >= the row's document start)."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        pad = BLOCK_D != D
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
            v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
            key_ok = offs_n < L
            kt = load_tile(kt_ptrs, key_ok[None, :], d_ok[:, None], MASKED, pad)
            v = load_tile(v_ptrs, key_ok[:, None], d_ok[None, :], MASKED, pad)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if MASKED:
                if DOCS:
                    # Keys >= L need no mask of their own here: only padding rows (>= L),
                    # whose outputs are zeroed, could see them. Fewer live masks: no spill.
                    keep = (offs_n[None, :] <= offs_m[:, None]) & (
                        offs_n[None, :] >= row_start[:, None]
                    )
                else:
                    keep = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
                s = tl.where(keep, s, float("-inf"))
            # Without documents every row sees key 0 in the first block it visits, so m_new
            # is finite. With them a row may see nothing yet; its running max then starts
            # at a finite -1e30 (see the kernel), so p and alpha stay exact (0 and 1).
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        LENS,
        DOC_START,
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
        GROUP,
        qk_scale,
        HAS_LENS: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Heaviest (last) query blocks first: better tail balance under causality.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        h_kv = h // GROUP  # the kv head of this query head's group
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        m_lo = pid_m * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = load_tile(q_ptrs, offs_m[:, None] < T, d_ok, True, BLOCK_D != D)

        # Packed rows: a finite start, as a row may see no key in its first blocks.
        m_i = tl.full([BLOCK_M], -1.0e30 if HAS_DOCS else float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys [lo, full_lo) and [full_hi, hi): masked; [full_lo, full_hi): every row of the
        # block sees every key (module docstring). Blocks past L: no work.
        live = m_lo < L
        last_row = tl.maximum(tl.minimum(m_lo + BLOCK_M, L) - 1, 0)
        hi = tl.where(live, tl.minimum(m_lo + BLOCK_M, L), 0)
        full_hi = tl.where(live, (tl.minimum(m_lo, L) // BLOCK_N) * BLOCK_N, 0)
        if HAS_DOCS:
            doc_base = DOC_START + b.to(tl.int64) * T
            row_start = tl.load(doc_base + offs_m, mask=offs_m < T, other=0)
            lo = tl.where(live, (tl.load(doc_base + m_lo) // BLOCK_N) * BLOCK_N, 0)
            full_lo = ((tl.load(doc_base + last_row) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(full_lo, full_hi)
        else:
            row_start = offs_m * 0
            lo = 0
            full_lo = 0
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, row_start, L, lo, full_lo, qk_scale, D, BLOCK_D, BLOCK_N, True, HAS_DOCS,
            PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, row_start, L, full_lo, full_hi, qk_scale, D, BLOCK_D, BLOCK_N, False,
            HAS_DOCS, PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, row_start, L, full_hi, hi, qk_scale, D, BLOCK_D, BLOCK_N, True, HAS_DOCS,
            PRECISION,
        )  # fmt: skip

        has_mass = l_i > 0.0
        l_safe = tl.where(has_mass, l_i, 1.0)
        out = acc / l_safe[:, None]
        out = tl.where((offs_m < L)[:, None], out, 0.0)
        lse = tl.where(has_mass, m_i + tl.log2(l_safe), 0.0)
        o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        store_tile(o_ptrs, out.to(O.dtype.element_ty), offs_m[:, None] < T, d_ok, BLOCK_D != D)
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)
