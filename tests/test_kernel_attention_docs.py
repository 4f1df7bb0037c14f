"""Packed rows: the Triton attention kernels with `document_ids` against the float64
reference (SDPA with an explicit block-diagonal causal mask), forward and every gradient.

Layouts are chosen against the launchers' real block sizes (fp32: 32x32 tiles; fp16:
forward 128x64, dk/dv 32x128 or 32x64, dq 128x32 or 64x32): documents of length 1, a
document spanning several key blocks, many tiny documents in one block, a document
starting mid-block, padding (written as its own document, and as `lengths`), grouped-query
attention and head dims 64/96/128. Buffers are NaN-poisoned as in test_kernel_attention.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import check_attention_against_float64, run_with_grads
from tritonlm.kernels import attention as attn

OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3)}
GRAD_TOL = {torch.float32: (3e-5, 3e-5), torch.float16: (1e-2, 1e-2)}


def _ids(*lengths: int) -> list[int]:
    """Document ids for consecutive documents of these lengths: (2, 1) -> [0, 0, 1]."""
    return [i for i, n in enumerate(lengths) for _ in range(n)]


def _inputs(B, H, H_kv, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype)


def _check(q, k, v, do, document_ids, lengths=None):
    return check_attention_against_float64(attn, q, k, v, do, OUT_TOL[q.dtype],
                                           GRAD_TOL[q.dtype], lengths, document_ids)  # fmt: skip


LAYOUTS = {
    # fp32 tiles are 32 wide: a 70-token document spans 3 key blocks, 19 documents of
    # length 1 at the end, one of length 1 at position 5.
    "fp32_long_and_single_tokens": (
        [_ids(5, 1, 70, 3, 2, 50, *[1] * 19)],
        2,
        1,
        32,
        torch.float32,
        None,
    ),
    # 4-token documents: 32 of them in one fp16 forward query block; second row padded.
    "fp16_many_tiny_docs_lengths": (
        [_ids(*[4] * 50), _ids(*[4] * 50)],
        2,
        2,
        64,
        torch.float16,
        [200, 77],
    ),
    # padding as a document of its own (id -1) after two documents, group 3, head dim 96.
    "fp32_pad_as_document_d96_gqa": ([_ids(30, 25) + [-1] * 25], 3, 1, 96, torch.float32, None),
    # wide heads: a document that starts mid key block and runs past the last block.
    "fp16_d128_mid_block_start": ([_ids(1, 99, 30)], 2, 1, 128, torch.float16, None),
    "single_token": ([[4]], 1, 1, 32, torch.float32, None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_rows_match_float64_reference(layout):
    ids, H, H_kv, D, dtype, lengths = LAYOUTS[layout]
    document_ids = torch.tensor(ids, dtype=torch.int32)
    B, T = document_ids.shape
    q, k, v, do = _inputs(B, H, H_kv, T, D, dtype, seed=T + D)
    lens = None if lengths is None else torch.tensor(lengths)
    out, (dq, dk, dv) = _check(q, k, v, do, document_ids, lens)
    for b, n in enumerate(lengths or []):
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.all(t[b, :, n:] == 0), f"{name}[{b}] not zero past length {n}"


def test_a_document_in_a_packed_row_equals_the_document_alone():
    """Document 1 of the row, run alone (positions shifted to 0), gives the same output and
    gradients as inside the row: nothing leaks across the boundary either way."""
    ids = torch.tensor([_ids(37, 50, 13)])
    q, k, v, do = _inputs(1, 2, 1, 100, 32, torch.float32, seed=1)
    out, grads = run_with_grads(
        lambda *t: attn.attention_triton(*t, document_ids=ids), [q, k, v], do
    )
    doc = slice(37, 87)
    alone, alone_grads = run_with_grads(
        attn.attention_triton, [t[:, :, doc] for t in (q, k, v)], do[:, :, doc]
    )
    torch.testing.assert_close(out[:, :, doc], alone, atol=1e-6, rtol=1e-5)
    for g, ga in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(g[:, :, doc], ga, atol=1e-6, rtol=1e-5)


def test_key_blocks_of_other_documents_are_never_loaded():
    """NaN in the keys/values of positions [0, 64) and in the queries/output grads of rows
    [96, 160): with documents [0, 70) and [70, 160) and fp32's 32-wide tiles, query
    blocks from row 96 on start their key loop at block 64, and key blocks below 64 stop
    their row loop at row 70. Loading a poisoned tile, even under a mask, would turn a
    result into NaN (0 * NaN in the dots)."""
    T = 160
    ids = torch.tensor([_ids(70, 90)])
    q, k, v, _ = _inputs(1, 1, 1, T, 32, torch.float32, seed=2)
    ref = attn.attention_reference(q.double(), k.double(), v.double(), document_ids=ids)
    k[:, :, :64] = float("nan")
    v[:, :, :64] = float("nan")
    out = attn.attention_triton(q, k, v, document_ids=ids)
    assert torch.isfinite(out[:, :, 96:]).all()
    torch.testing.assert_close(out[:, :, 96:].double(), ref[:, :, 96:], atol=1e-5, rtol=1e-5)

    # dq of rows >= 96 never touches keys < 64.
    q2, k2, v2, do2 = _inputs(1, 1, 1, T, 32, torch.float32, seed=3)
    k2[:, :, :64] = float("nan")
    v2[:, :, :64] = float("nan")
    _, (dq, _, _) = run_with_grads(
        lambda *t: attn.attention_triton(*t, document_ids=ids), [q2, k2, v2], do2
    )
    assert torch.isfinite(dq[:, :, 96:]).all()

    # dk/dv of keys < 64 never touch rows >= 96.
    q3, k3, v3, do3 = _inputs(1, 1, 1, T, 32, torch.float32, seed=4)
    q3[:, :, 96:] = float("nan")
    do3[:, :, 96:] = float("nan")
    _, (_, dk, dv) = run_with_grads(
        lambda *t: attn.attention_triton(*t, document_ids=ids), [q3, k3, v3], do3
    )
    assert torch.isfinite(dk[:, :, :64]).all() and torch.isfinite(dv[:, :, :64]).all()


def test_document_bounds_are_runs_of_equal_ids():
    start, end = attn.document_bounds(torch.tensor([[7, 7, 3, 3, 3], [1, 2, 2, 1, 1]]))
    assert start.tolist() == [[0, 0, 2, 2, 2], [0, 1, 1, 3, 3]]
    assert end.tolist() == [[2, 2, 5, 5, 5], [1, 3, 3, 5, 5]]
    assert start.dtype == end.dtype == torch.int32


def test_reference_mask_worked_example():
    """ids [7, 7, 3]: row 2 sees only itself, so its output is v[2] exactly."""
    q = torch.randn(1, 1, 3, 32, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 32, dtype=torch.float64)
    out = attn.attention_reference(q, q, v, document_ids=torch.tensor([[7, 7, 3]]))
    torch.testing.assert_close(out[0, 0, 2], v[0, 0, 2])
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


def test_bad_document_ids_are_refused():
    q = torch.randn(2, 1, 8, 32)
    with pytest.raises(ValueError, match="document_ids must be an integer tensor"):
        attn.attention_triton(q, q, q, document_ids=torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="document_ids must be an integer tensor"):
        attn.attention_triton(q, q, q, document_ids=torch.zeros(2, 8))
