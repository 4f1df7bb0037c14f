"""Fused causal attention (Triton, run by the interpreter) against the float64 reference.

Every buffer the kernels fill (output, logsumexp, delta, dq, dk, dv) is allocated NaN
poisoned (`poisoned_allocations`), so an element a kernel forgot to write fails the
comparison. Shapes are tiny but awkward: T in {1, 17, 80, 130, 200} covers a single row,
tails shorter than every block, several query/key blocks, the unmasked (fully below the
diagonal) loops of every kernel, and the masked diagonal/length loops. The launchers use
their real GPU block sizes (`attention_config`) here: nothing is shrunk for the tests.
Grouped-query attention (k, v with H // G heads) is checked for group sizes 1, 2, 3 and 4
and head dim 96 (tiles padded to 128 columns) with and without lengths.

Tolerances (|err| <= atol + rtol*|ref| against float64):
  float32: output 1e-5, gradients 3e-5 - fp32 accumulation, exact ("ieee") dots; only
           summation order and exp2/log2 rounding differ (a few ulps of O(1) sums).
  float16: output 4e-3, gradients 1e-2 - inputs and output rounded to 11-bit mantissas
           (~5e-4 relative each); P and dS are rounded to fp16 before their dots (as on the
           GPU), and dk/dv/dq sum up to T such rounded terms.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import assert_close64, float64_run, poisoned_allocations, run_with_grads
from tritonlm.kernels import attention as attn

OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3)}
GRAD_TOL = {torch.float32: (3e-5, 3e-5), torch.float16: (1e-2, 1e-2)}


def _inputs(B, H, T, D, dtype, seed, scale=1.0, H_kv=None):
    """q, k, v, dO; k and v with `H_kv` heads (default H)."""
    g = torch.Generator().manual_seed(seed)
    H_kv = H if H_kv is None else H_kv
    q, do = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(2))
    return (q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype), do.to(dtype)


def _check_against_reference(q, k, v, do, lengths=None, scale=None, tol_scale=1.0):
    """Run the Triton path (poisoned buffers) and the float64 reference; compare all.
    ``tol_scale`` widens the tolerances for inputs whose scores are far from unit size."""
    dtype = q.dtype

    def triton_fn(q_, k_, v_):
        return attn.attention_triton(q_, k_, v_, lengths, scale)

    def reference_fn(q_, k_, v_):
        return attn.attention_reference(q_, k_, v_, lengths, scale)

    with poisoned_allocations(attn):
        out, grads = run_with_grads(triton_fn, [q, k, v], do)
    ref, ref_grads = float64_run(reference_fn, [q, k, v], do)
    assert out.dtype == dtype
    out_tol, grad_tol = (tuple(t * tol_scale for t in tab[dtype]) for tab in (OUT_TOL, GRAD_TOL))
    assert_close64(out, ref, *out_tol, name="out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close64(g, rg, *grad_tol, name=name)
    return out, grads


CASES = [
    # B, H, T, D, dtype
    (1, 1, 1, 32, torch.float32),  # a single token: only key 0, one partial block
    (2, 1, 17, 64, torch.float16),  # tail shorter than every block
    (1, 2, 80, 32, torch.float32),  # fwd: 1 query block, 2 key blocks (diagonal only)
    (1, 1, 130, 128, torch.float32),  # wide heads: every kernel's unmasked loop
    (1, 1, 130, 128, torch.float16),
    (2, 2, 130, 64, torch.float16),  # 2 query blocks, masked tail of 2 rows
    (1, 1, 200, 32, torch.float16),  # narrow heads: dk/dv unmasked loop (rows 128..191)
]


@pytest.mark.parametrize("B,H,T,D,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_forward_and_gradients_match_float64_reference(B, H, T, D, dtype):
    q, k, v, do = _inputs(B, H, T, D, dtype, seed=T * 1000 + D)
    _check_against_reference(q, k, v, do)


GQA_CASES = [
    # B, H, H_kv, T, D, dtype, lengths
    (1, 4, 1, 17, 32, torch.float32, None),  # group 4 (one kv head): dk/dv sum 4 heads
    (2, 4, 2, 80, 64, torch.float16, [80, 33]),  # group 2, a length inside a block
    (1, 6, 2, 37, 32, torch.float32, [30]),  # group 3 (not a power of two)
    (1, 2, 2, 130, 96, torch.float16, None),  # head dim 96, group 1: every unmasked loop
    (2, 6, 3, 40, 96, torch.float32, [40, 5]),  # head dim 96, group 2, lengths
    (1, 2, 1, 80, 128, torch.float32, None),  # wide heads, group 2
]


@pytest.mark.parametrize(
    "B,H,H_kv,T,D,dtype,lengths", GQA_CASES, ids=lambda c: str(c).replace("torch.", "")
)
def test_grouped_query_and_head_dim_96_match_float64_reference(B, H, H_kv, T, D, dtype, lengths):
    """k, v with H_kv heads; dk/dv come back [B, H_kv, T, D], summed over each group."""
    q, k, v, do = _inputs(B, H, T, D, dtype, seed=H * 100 + T + D, H_kv=H_kv)
    lens = None if lengths is None else torch.tensor(lengths)
    out, (dq, dk, dv) = _check_against_reference(q, k, v, do, lengths=lens)
    assert out.shape == dq.shape == (B, H, T, D)
    assert dk.shape == dv.shape == (B, H_kv, T, D)
    for b, n in enumerate(lengths or []):
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.all(t[b, :, n:] == 0), f"{name}[{b}] not zero past length {n}"


def test_head_dim_96_never_reads_the_padding_columns():
    """q, k, v, dO as [..., :96] views of 128-wide NaN-filled buffers: the kernels' tiles
    are 128 wide, so any unmasked load of columns 96..127 would turn results into NaN."""
    B, H, T, D = 1, 2, 40, 96
    q, k, v, do = _inputs(B, H, T, D, torch.float32, seed=96, H_kv=1)

    def in_wide_buffer(t):
        wide = torch.full((*t.shape[:-1], 128), float("nan"), dtype=t.dtype)
        wide[..., :D] = t
        return wide[..., :D]

    q, k, v, do = map(in_wide_buffer, (q, k, v, do))
    assert q.stride(-2) == 128
    _check_against_reference(q, k, v, do, lengths=torch.tensor([33]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_padded_batch_lengths(dtype):
    """Per-sequence lengths: 1, full, and one ending inside a block. Padding query rows
    give exactly 0 output and 0 dq; keys past the length get exactly 0 dk and dv."""
    B, H, T, D = 3, 1, 130, 64
    lengths = torch.tensor([1, T, 70])
    q, k, v, do = _inputs(B, H, T, D, dtype, seed=7)
    out, (dq, dk, dv) = _check_against_reference(q, k, v, do, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.all(t[b, :, n:] == 0), f"{name}[{b}] not zero past length {n}"
        assert torch.all(dv[b, :, :n].abs().sum(-1) > 0)  # every valid key got a gradient


def test_lengths_as_int32_on_short_sequence_with_scale():
    q, k, v, do = _inputs(2, 2, 17, 32, torch.float32, seed=3)
    _check_against_reference(
        q, k, v, do, lengths=torch.tensor([17, 9], dtype=torch.int32), scale=0.3
    )


def test_non_contiguous_inputs_from_fused_qkv_and_strided_grad():
    """q, k, v as views of one [B, T, 3, H, D] projection output; dO a transposed view."""
    B, H, T, D = 2, 2, 80, 64
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3, H, D, generator=g)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, T, D], strided views
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    assert not do.is_contiguous()
    _check_against_reference(q, k, v, do, lengths=torch.tensor([80, 33]))


def test_large_logits_do_not_overflow():
    """Scores of a few hundred: a naive exp would overflow; the online softmax must not."""
    q, k, v, do = _inputs(1, 1, 80, 32, torch.float32, seed=5, scale=6.0)
    # Scores of ~300 carry fp32 rounding of ~300 * 6e-8 into every exp: the gradients are
    # right to a few 1e-5 relative, not to the 3e-5 of unit-size inputs.
    _check_against_reference(q, k, v, do, tol_scale=4.0)


@pytest.mark.parametrize("H_kv", [2, 1], ids=["mha", "gqa"])
def test_output_layout_and_determinism(H_kv):
    """The output's transpose(1, 2) is contiguous ([B, T, H, D] memory, heads merge for
    free), and two runs give bit-identical results, dk/dv of a shared kv head included
    (no atomics in the backward: the group's heads are summed in a fixed order)."""
    q, k, v, do = _inputs(1, 2, 17, 32, torch.float32, seed=9, H_kv=H_kv)
    runs = [run_with_grads(attn.attention_triton, [q, k, v], do) for _ in range(2)]
    (out1, g1), (out2, g2) = runs
    assert out1.transpose(1, 2).is_contiguous()
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    assert g1[1].shape == (1, H_kv, 17, 32) and g1[1].is_contiguous()


def test_rejects_bad_inputs():
    q = torch.randn(1, 1, 8, 48)
    with pytest.raises(ValueError, match="head dims"):
        attn.attention_triton(q, q, q)
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        attn.attention_triton(q, q, torch.randn(1, 1, 9, 32))
    q3, k2 = torch.randn(1, 3, 8, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value"):
        attn.attention_triton(q3, k2, k2)
    with pytest.raises(ValueError, match="multiple"):
        attn.attention_reference(q3, k2, k2)
    with pytest.raises(ValueError, match=r"\[B, Hkv, T, D\]"):  # k and v disagree
        attn.attention_triton(q3, torch.randn(1, 3, 8, 32), torch.randn(1, 1, 8, 32))
    with pytest.raises(ValueError, match="lengths"):
        attn.attention_triton(q, q, q, lengths=torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="dtype"):
        attn.attention_triton(q.double(), q.double(), q.double())


# ---------------------------------------------------------------- the reference itself


def test_reference_with_lengths_equals_each_sequence_alone():
    B, H, T, D = 3, 2, 12, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([12, 1, 7])
    out = attn.attention_reference(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = attn.attention_reference(
            q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        )
        torch.testing.assert_close(out[b : b + 1, :, :n], alone, rtol=1e-12, atol=1e-12)
        assert torch.all(out[b, :, n:] == 0)


def test_reference_grouped_query_uses_kv_head_h_over_group():
    """The Llama / Hugging Face convention: query head h attends with kv head h // G
    (repeat_interleave), checked head by head against plain attention."""
    B, H, H_kv, T, D = 1, 6, 2, 5, 4
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    out = attn.attention_reference(q, k, v, torch.tensor([4]))
    for h in range(H):
        kv = h // (H // H_kv)
        alone = attn.attention_reference(
            q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], torch.tensor([4])
        )
        torch.testing.assert_close(out[:, h : h + 1], alone, rtol=1e-12, atol=1e-12)


def test_reference_is_causal_softmax_attention():
    """Worked example: T=2, D=1, scale 1 -> row 0 copies v0, row 1 mixes v0, v1."""
    q = torch.tensor([[[[1.0], [2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0], [1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0], [5.0]]]], dtype=torch.float64)
    out = attn.attention_reference(q, k, v, scale=1.0)
    w1 = math.exp(2.0) / (1.0 + math.exp(2.0))  # softmax([0, 2])[1]
    expected = torch.tensor([[[[3.0], [3.0 * (1 - w1) + 5.0 * w1]]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- block sizes / AOT specs


def test_launchers_take_block_sizes_from_attention_config(monkeypatch):
    """The launchers call `attention_config` (the function `aot_specs` builds from)."""
    seen = []
    original = attn.attention_config

    def spy(head_dim, dtype, docs=False, arch="default", path=None, grouped=False):
        seen.append((head_dim, dtype, arch, grouped))
        return original(head_dim, dtype, docs, arch, path, grouped)

    monkeypatch.setattr(attn, "attention_config", spy)
    q, k, v, do = _inputs(1, 1, 17, 32, torch.float32, seed=2)
    run_with_grads(attn.attention_triton, [q, k, v], do)
    assert seen == [(32, torch.float32, "cpu", False)] * 2  # forward, backward launcher
    seen.clear()
    q, k, v, do = _inputs(1, 4, 17, 32, torch.float32, seed=2, H_kv=2)
    run_with_grads(attn.attention_triton, [q, k, v], do)
    assert seen == [(32, torch.float32, "cpu", False), (32, torch.float32, "cpu", True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aot_specs_cover_every_kernel_with_launcher_block_sizes(dtype):
    """Every kernel, head dim and (where it applies) GROUP variant: the constant 1 that
    multi-head launches specialize to, and the grouped-query i32."""
    specs = attn.aot_specs(dtype)
    t = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    by_name = {s.name: s for s in specs}
    for D in attn.SUPPORTED_HEAD_DIMS:
        cfg = attn.attention_config(D, dtype)
        packed = attn.attention_config(D, dtype, docs=True)
        grouped = attn.attention_config(D, dtype, grouped=True)
        for kernel, kc, variants in (
            ("fwd", cfg.fwd, ("", "_gqa", "_docs", "_docs_gqa")),
            ("bwd_preprocess", cfg.preprocess, ("",)),
            ("bwd_dkdv", cfg.dkdv, ("", "_gqa", "_docs", "_docs_gqa")),
            ("bwd_dq", cfg.dq, ("", "_gqa", "_docs", "_docs_gqa")),
        ):
            for variant in variants:
                spec = by_name[f"attention_{kernel}{variant}_d{D}_{t}"]
                # the packed forward has its own launch config (more warps)
                c = packed.fwd if kernel == "fwd" and variant.startswith("_docs") else kc
                # grouped-query dk/dv has its own tiles (its group loop keeps more live)
                c = grouped.dkdv if kernel == "bwd_dkdv" and variant.endswith("gqa") else c
                assert spec.constexprs["D"] == D
                assert spec.constexprs["BLOCK_D"] == attn.block_d(D) >= D
                assert spec.constexprs["BLOCK_M"] == c.block_m
                assert (spec.num_warps, spec.num_stages) == (c.num_warps, c.num_stages)
                if kernel != "bwd_preprocess":  # tl.dot tiles must be >= 16 on real hardware
                    assert spec.constexprs["BLOCK_N"] == c.block_n
                    assert min(c.block_m, c.block_n, D) >= 16
                    group = spec.constexprs.get("GROUP", spec.signature["GROUP"])
                    assert group == ("i32" if variant.endswith("gqa") else 1)
                    assert spec.constexprs["HAS_DOCS"] == variant.startswith("_docs")
                # every kernel argument is typed, in the kernel's own order
                assert list(spec.signature) == list(spec.fn.arg_names)
                assert all(spec.signature[c] == "constexpr" for c in spec.constexprs)
                assert any(v.startswith(f"*{t}") for v in spec.signature.values())
    assert len(specs) == 13 * len(attn.SUPPORTED_HEAD_DIMS)
    assert attn.SUPPORTED_HEAD_DIMS == (32, 64, 96, 128)
