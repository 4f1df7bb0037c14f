"""Backward Triton kernels of causal attention (launched by :mod:`.attention`).

Notation per (batch, head): S = scale * Q K^T, masked to -inf where a key comes after the
query row or is >= the sequence length L; P = softmax(S) row by row; O = P V. Given dO:
    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)
    dQ = scale * dS K                     dK = scale * dS^T Q
where delta[i] = sum_j P[i, j] dP[i, j] is the softmax Jacobian's correction term. P is
never stored: it is recomputed tile by tile from Q, K and the forward's per-row logsumexp
(base 2) as P = exp2(S * log2(e) - lse), which is why the forward saves lse.

Three kernels, in launch order:
  1. preprocess: delta = rowsum(dO * O), one value per query row (see its docstring).
  2. dk/dv: one program per (key block, kv head), looping over the query heads of its
     group and, for each, over the query blocks that see the key block.
  3. dq: one program per (query block, query head), looping over the key blocks it sees
     (of kv head h // GROUP).
Splitting dk/dv from dq computes S and P twice, but every program writes only its own
rows: no atomics, so the gradients are deterministic. Grouped-query attention: a kv head
is shared by GROUP query heads, so its dK and dV are sums over them; the dk/dv program
adds them in a fixed order (head by head, in fp32) and stores once, instead of
one program per query head racing to add into the same rows. Head dims that are not a
power of two run in padded BLOCK_D tiles, as in the forward (`load_tile`, `store_tile`).

Packed rows (HAS_DOCS): DOC_START / DOC_END [B, T] hold the first position of each
position's document and the position after its last one. The extra mask is
key >= start[row]. dq visits the key blocks the forward visits (from start[m_lo]). A key
block [n_lo, n_hi) is seen only by rows before end[n_hi - 1] (rows after it belong to later
documents), so dk/dv stops there, and its unmasked loop stops at end[n_lo] (rows past it
start their document after n_lo).
"""

from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from ._attention_fwd import load_tile, store_tile

    @triton.jit
    def attn_bwd_preprocess_kernel(
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
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """delta[row] = sum_d dO[row, d] * O[row, d] in fp32 (0 on padding rows: O = 0).

        Why: the softmax backward needs, per query row i, sum_j P[i, j] * dP[i, j] with
        dP = dO V^T. Expanding dP gives sum_j P[i, j] * (dO[i] . v[j]) = dO[i] . O[i],
        because O[i] = sum_j P[i, j] * v[j]. So one pass over two [T, D] tensors replaces
        a pass over every key block of every row, and both later kernels can form dS
        block by block with delta already known.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
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
        o = load_tile(o_ptrs, row_ok, d_ok, True, BLOCK_D != D).to(tl.float32)
        do = load_tile(do_ptrs, row_ok, d_ok, True, BLOCK_D != D).to(tl.float32)
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
        start_base,
        L,
        lo,
        hi,
        qk_scale,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASKED: tl.constexpr,
        DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Accumulate dk (unscaled) and dv of one key block over query blocks [lo, hi).

        Works on transposed tiles ([keys, rows]) so dk and dv come out key-major with no
        transposed accumulator. MASKED adds the causal mask (key <= row) and drops rows
        >= L; the unmasked variant is for blocks the caller knows need neither.
        """
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        pad = BLOCK_D != D
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd
            do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
            row_ok = offs_m < L
            qt = load_tile(qt_ptrs, row_ok[None, :], d_ok[:, None], MASKED, pad)
            do = load_tile(do_ptrs, row_ok[:, None], d_ok[None, :], MASKED, pad)
            if MASKED:
                lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            else:
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            if MASKED:
                # -inf -> P = 0: keys after the row (as in the forward) and padding rows.
                keep = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :]
                if DOCS:  # and the row's document starts at or before the key
                    row_start = tl.load(start_base + offs_m, mask=row_ok, other=0)
                    keep = keep & (offs_n[:, None] >= row_start[None, :])
                st = tl.where(keep, st, float("-inf"))
            # The forward's probabilities, recomputed from the row's base-2 logsumexp.
            pt = tl.exp2(st - lse[None, :])
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T = V dO^T
            dst = pt * (dpt - delta[None, :])  # dS = P * (dP - delta), transposed
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        LSE,
        DELTA,
        LENS,
        DOC_START,
        DOC_END,
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
        GROUP,
        qk_scale,
        sm_scale,
        HAS_LENS: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program per (key block [n_lo, n_lo + BLOCK_N), kv head): it alone writes those
        # rows of dk and dv (no atomics). Low key blocks are seen by the most query rows, so
        # program 0 is already the heaviest and is launched first.
        pid_n = tl.program_id(0)
        pid_bkv = tl.program_id(1)
        H_KV = H // GROUP
        b = pid_bkv // H_KV
        h_kv = pid_bkv % H_KV
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        n_lo = pid_n * BLOCK_N
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        pad = BLOCK_D != D
        b64 = b.to(tl.int64)
        hkv64 = h_kv.to(tl.int64)
        key_in = offs_n[:, None] < T
        k_ptrs = K + b64 * stride_kb + hkv64 * stride_kh
        k_ptrs += offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        k = load_tile(k_ptrs, key_in, d_ok, True, pad)
        v_ptrs = V + b64 * stride_vb + hkv64 * stride_vh
        v_ptrs += offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        v = load_tile(v_ptrs, key_in, d_ok, True, pad)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Which query rows see this key block? Causal: row >= key, so rows >= n_lo; lengths:
        # rows < L. Rows [0, n_lo) are skipped outright; rows [n_lo, L) are visited in
        # BLOCK_M-aligned query blocks, split three ways:
        #   [m_start, diag_end)           query blocks overlapping the diagonal: some row
        #                                 of the block comes before some key of ours, and
        #                                 that score must be -inf as in the forward -> masked
        #   [diag_end, full_end)          every row >= n_lo + BLOCK_N > every key here, and
        #                                 every row < L -> no mask, the fast loop
        #   [max(diag_end, full_end), L)  the block holding row L - 1 when L is not a
        #                                 multiple of BLOCK_M: rows >= L masked
        # Example, BLOCK_N = 64, BLOCK_M = 32, L = 200, the key block at n_lo = 64:
        # masked [64, 128), unmasked [128, 192), masked [192, 200). When L falls inside the
        # diagonal blocks, the middle and last ranges are empty and the first one's mask
        # drops rows >= L.
        # m_start rounds n_lo down to a block start (rows < n_lo in that first block are
        # removed by the causal mask); diag_end rounds n_lo + BLOCK_N up to one. A key block
        # at or past L is all padding: m_end = 0 and no loop runs. Keys >= L inside a live
        # block need no mask of their own: only rows >= key >= L could see them, and those
        # padding rows are masked; the store below writes zeros for them anyway.
        # Packed rows: only rows before end[last key] see the block (m_end), and only rows
        # before end[n_lo] see all of it (full_end); L still bounds both.
        m_start = (n_lo // BLOCK_M) * BLOCK_M
        diag_end = ((n_lo + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        start_base = DOC_START + b64 * T
        if HAS_DOCS:
            end_base = DOC_END + b64 * T
            last_key = tl.maximum(tl.minimum(n_lo + BLOCK_N, L) - 1, 0)
            m_end = tl.where(n_lo < L, tl.minimum(tl.load(end_base + last_key), L), 0)
            full_end = (tl.minimum(tl.load(end_base + n_lo), L) // BLOCK_M) * BLOCK_M
        else:
            m_end = tl.where(n_lo < L, L, 0)
            full_end = (L // BLOCK_M) * BLOCK_M
        # The query heads h_kv * GROUP + g of the group, in order: their contributions add
        # into the same fp32 dk/dv tiles, so the sum's order is fixed (deterministic).
        for g in range(0, GROUP):
            h64 = hkv64 * GROUP + g
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            lse_base = LSE + (b64 * H + h64) * T  # lse and delta are [B, H, T]
            delta_base = DELTA + (b64 * H + h64) * T
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
                stride_dot, stride_dod, offs_n, start_base, L, m_start,
                tl.minimum(diag_end, m_end), qk_scale, D, BLOCK_D, BLOCK_M, True, HAS_DOCS,
                PRECISION,
            )  # fmt: skip
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
                stride_dot, stride_dod, offs_n, start_base, L, diag_end, full_end,
                qk_scale, D, BLOCK_D, BLOCK_M, False, HAS_DOCS, PRECISION,
            )  # fmt: skip
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
                stride_dot, stride_dod, offs_n, start_base, L, tl.maximum(diag_end, full_end),
                m_end, qk_scale, D, BLOCK_D, BLOCK_M, True, HAS_DOCS, PRECISION,
            )  # fmt: skip

        # S = scale * Q K^T, so dK = scale * dS^T Q: the scale is applied once, here.
        key_ok = (offs_n < L)[:, None]
        dk = tl.where(key_ok, dk * sm_scale, 0.0)
        dv = tl.where(key_ok, dv, 0.0)
        dk_ptrs = DK + b64 * stride_dkb + hkv64 * stride_dkh
        dk_ptrs += offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b64 * stride_dvb + hkv64 * stride_dvh
        dv_ptrs += offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
        store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), key_in, d_ok, pad)
        store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), key_in, d_ok, pad)

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
        """Accumulate dq (unscaled) of one query block over key blocks [lo, hi).

        The dk/dv loop's recomputation in [rows, keys] orientation:
        P = exp2(S - lse), dS = P * (dO V^T - delta), dQ += dS K.
        """
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[:, None] < D
        pad = BLOCK_D != D
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
            vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
            key_ok = offs_n < L
            kt = load_tile(kt_ptrs, key_ok[None, :], d_ok, MASKED, pad)
            vt = load_tile(vt_ptrs, key_ok[None, :], d_ok, MASKED, pad)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            if MASKED:
                keep = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
                if DOCS:
                    keep = keep & (offs_n[None, :] >= row_start[:, None])
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
        return dq

    @triton.jit
    def attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
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
        GROUP,
        qk_scale,
        sm_scale,
        HAS_LENS: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program per query block [m_lo, m_lo + BLOCK_M): it alone writes those rows of
        # dq. Heaviest (last) query blocks first, as in the forward. Keys and values are
        # those of kv head h // GROUP.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        h_kv = h // GROUP
        if HAS_LENS:
            L = tl.minimum(tl.load(LENS + b), T)
        else:
            L = T
        m_lo = pid_m * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        pad = BLOCK_D != D
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        row_in = offs_m < T
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh
        q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = load_tile(q_ptrs, row_in[:, None], d_ok, True, pad)
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh
        do_ptrs += offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
        do = load_tile(do_ptrs, row_in[:, None], d_ok, True, pad)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
        k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Which keys do these rows see? Keys <= row and < L: keys [0, hi) with
        # hi = min(m_lo + BLOCK_M, L) (the block's last row sees keys up to itself):
        #   [0, full_hi)   key blocks ending at or before m_lo (and L): every key is before
        #                  every row of the block and valid -> unmasked
        #   [full_hi, hi)  key blocks overlapping the diagonal (some key after some row:
        #                  that score must be -inf) and the length tail -> masked
        # A query block at or past L is padding: no loop runs and its dq rows are zero.
        # Packed rows: key blocks [lo, full_lo) are masked too, as in the forward.
        live = m_lo < L
        last_row = tl.maximum(tl.minimum(m_lo + BLOCK_M, L) - 1, 0)
        hi = tl.where(live, tl.minimum(m_lo + BLOCK_M, L), 0)
        full_hi = tl.where(live, (tl.minimum(m_lo, L) // BLOCK_N) * BLOCK_N, 0)
        if HAS_DOCS:
            doc_base = DOC_START + b64 * T
            row_start = tl.load(doc_base + offs_m, mask=row_in, other=0)
            lo = tl.where(live, (tl.load(doc_base + m_lo) // BLOCK_N) * BLOCK_N, 0)
            full_lo = ((tl.load(doc_base + last_row) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(full_lo, full_hi)
        else:
            row_start = offs_m * 0
            lo = 0
            full_lo = 0
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, offs_m, row_start, L, lo, full_lo, qk_scale, D, BLOCK_D, BLOCK_N, True,
            HAS_DOCS, PRECISION,
        )  # fmt: skip
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, offs_m, row_start, L, full_lo, full_hi, qk_scale, D, BLOCK_D, BLOCK_N,
            False, HAS_DOCS, PRECISION,
        )  # fmt: skip
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, offs_m, row_start, L, full_hi, hi, qk_scale, D, BLOCK_D, BLOCK_N, True,
            HAS_DOCS, PRECISION,
        )  # fmt: skip

        dq = tl.where((offs_m < L)[:, None], dq * sm_scale, 0.0)  # dQ = scale * dS K
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh
        dq_ptrs += offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
        store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), row_in[:, None], d_ok, pad)
