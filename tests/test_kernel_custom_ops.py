"""The Triton kernels as PyTorch custom ops (``torch.ops.tritonlm.*``), run by the interpreter.

1. ``torch.library.opcheck`` on every op: the schema (no undeclared mutation, no output
   aliasing an input), the fake implementation against the real outputs (shapes, dtypes,
   strides), the autograd registration, and the op traced by AOTAutograd with dynamic
   shapes against eager (forward and backward).
2. ``torch.compile(fullgraph=True, backend="aot_eager")`` of a small function calling each
   ``dispatch`` op with backend="triton": no graph break (``torch._dynamo.explain``), and
   the compiled loss and gradients equal eager ones.

Shapes are tiny but awkward (odd row counts, hidden sizes that are not powers of two,
sequences shorter than every block), so the whole file runs in seconds on two cores.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from tritonlm.kernels import attention as attention_mod
from tritonlm.kernels import dispatch

ops = torch.ops.tritonlm  # registered when tritonlm.kernels.dispatch is imported


def _randn(*shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + len(shape) * 100 + shape[-1])
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _targets():
    return torch.tensor([3, -100, 10, 0, 7])  # N = 5 rows, V = 11 classes, one ignored


def _rms_norm_backward_args():
    x, w = _randn(2, 3, 7), _randn(7, seed=1)
    _, rstd = ops.rms_norm(x, w, 1e-6)
    return (_randn(2, 3, 7, seed=2), x, w, rstd)


def _attention_backward_args(H_kv=2, D=32, docs=False):
    q = _randn(2, 2, 5, D)
    k, v = (_randn(2, H_kv, 5, D, seed=s) for s in (1, 2))
    lengths = torch.tensor([5, 3], dtype=torch.int32)
    bounds = _doc_bounds() if docs else (None, None)
    out, lse = ops.attention(q, k, v, lengths, None, *bounds)
    return (_randn(2, 2, 5, D, seed=3), q, k, v, out, lse, lengths, None, *bounds)


def _doc_bounds():
    """Document bounds of two rows of T = 5: [0, 0, 1, 1, 1] and [4, 5, 5, 6, 6]."""
    return attention_mod.document_bounds(torch.tensor([[0, 0, 1, 1, 1], [4, 5, 5, 6, 6]]))


def _attention_args(B, T, lengths=None, scale=None, H_kv=2, D=32):
    """q with 2 heads; k, v with H_kv (grouped-query attention when 1)."""
    q = _randn(B, 2, T, D, grad=True)
    k, v = (_randn(B, H_kv, T, D, grad=True, seed=s) for s in (1, 2))
    return (q, k, v, lengths, scale)


def _linear_args(hidden_grad, weight_grad, chunk_size, ce_step):
    hidden, weight = _randn(5, 8, grad=hidden_grad), _randn(11, 8, grad=weight_grad)
    return (hidden, weight, _targets(), -100, chunk_size, ce_step, hidden_grad, weight_grad)


# case -> (op name, its arguments)
OPCHECK_CASES = {
    "rms_norm": lambda: ("rms_norm", (_randn(2, 3, 7, grad=True), _randn(7, grad=True), 1e-6)),
    "rms_norm_backward": lambda: ("rms_norm_backward", _rms_norm_backward_args()),
    "attention_lengths": lambda: (
        "attention",
        _attention_args(2, 5, torch.tensor([5, 3], dtype=torch.int32)),
    ),
    "attention_scale": lambda: ("attention", _attention_args(1, 3, scale=0.3)),
    "attention_backward": lambda: ("attention_backward", _attention_backward_args()),
    "attention_gqa_d96": lambda: (
        "attention",
        _attention_args(2, 5, torch.tensor([5, 3], dtype=torch.int32), H_kv=1, D=96),
    ),
    "attention_backward_gqa": lambda: ("attention_backward", _attention_backward_args(H_kv=1)),
    "attention_docs": lambda: ("attention", (*_attention_args(2, 5, H_kv=1), *_doc_bounds())),
    "attention_backward_docs": lambda: (
        "attention_backward",
        _attention_backward_args(docs=True),
    ),
    "cross_entropy": lambda: ("cross_entropy", (_randn(5, 11, grad=True), _targets(), -100, True)),
    "cross_entropy_no_grad": lambda: ("cross_entropy", (_randn(5, 11), _targets(), -100, False)),
    "linear_cross_entropy": lambda: ("linear_cross_entropy", _linear_args(True, True, 2, "triton")),
    "linear_cross_entropy_torch_step_hidden_only": lambda: (
        "linear_cross_entropy",
        _linear_args(True, False, None, "torch"),
    ),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    name, args = OPCHECK_CASES[case]()
    torch.library.opcheck(getattr(ops, name), args)


def test_every_registered_op_is_opchecked():
    registered = {
        name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)
    }
    assert {OPCHECK_CASES[case]()[0] for case in OPCHECK_CASES} == registered


# --------------------------------------------------------------- torch.compile, no breaks


def _rms_norm_loss(x, w):
    return dispatch.rms_norm(x, w, 1e-5, backend="triton").square().sum()


def _attention_loss(q, k, v, lengths, document_ids=None):
    out = dispatch.attention(q, k, v, lengths, backend="triton", document_ids=document_ids)
    return (out * torch.linspace(-1.0, 1.0, out.shape[-1])).sum()


def _cross_entropy_loss(logits, targets):
    return 3.0 * dispatch.cross_entropy(logits, targets, backend="triton")


def _linear_cross_entropy_loss(hidden, weight, targets):
    return 3.0 * dispatch.linear_cross_entropy(hidden, weight, targets, backend="triton")


COMPILE_CASES = {
    "rms_norm": lambda: (_rms_norm_loss, (_randn(3, 7, grad=True), _randn(7, grad=True))),
    "attention": lambda: (
        _attention_loss,
        (*(_randn(2, 1, 5, 32, grad=True, seed=s) for s in range(3)), torch.tensor([5, 2])),
    ),
    "attention_gqa": lambda: (  # 4 query heads, 2 kv heads: dk/dv come back [2, 2, 5, 32]
        _attention_loss,
        (
            _randn(2, 4, 5, 32, grad=True),
            *(_randn(2, 2, 5, 32, grad=True, seed=s) for s in (1, 2)),
            torch.tensor([5, 2]),
        ),
    ),
    "attention_docs": lambda: (  # packed rows: document bounds are computed in the graph
        _attention_loss,
        (
            *(_randn(2, 1, 5, 32, grad=True, seed=s) for s in range(3)),
            torch.tensor([5, 4]),
            torch.tensor([[0, 0, 1, 1, 1], [3, 4, 4, 4, 9]]),
        ),
    ),
    "cross_entropy": lambda: (_cross_entropy_loss, (_randn(5, 11, grad=True), _targets())),
    "linear_cross_entropy": lambda: (
        _linear_cross_entropy_loss,
        (_randn(5, 8, grad=True), _randn(11, 8, grad=True), _targets()),
    ),
}


def _loss_and_grads(fn, inputs):
    leaves = [x for x in inputs if x.requires_grad]
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compiled_dispatch_has_no_graph_break_and_matches_eager(case):
    fn, inputs = COMPILE_CASES[case]()
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    backend = CompileCounterWithBackend("aot_eager")  # aot_eager, counting what it compiles
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss, grads = _loss_and_grads(compiled, inputs)
    assert backend.frame_count == 1 and backend.op_count >= 1
    ref_loss, ref_grads = _loss_and_grads(fn, inputs)
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)
