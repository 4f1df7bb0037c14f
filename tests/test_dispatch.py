"""The backend seam: which implementation each backend name reaches, and life without triton."""

import subprocess
import sys

import pytest
import torch
from tritonlm.kernels import attention as attention_mod
from tritonlm.kernels import cross_entropy, dispatch, rmsnorm


def test_resolve_backend_rules():
    cpu = torch.zeros(1)
    assert dispatch.resolve_backend("auto", cpu) == "torch"
    assert dispatch.resolve_backend("torch", cpu) == "torch"
    assert dispatch.resolve_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dispatch.resolve_backend("cuda", cpu)


def _spy(monkeypatch, name):
    """Replace the Triton launcher `name` with a recorder."""
    module = {
        "rms_norm_triton": rmsnorm,
        "attention_triton": attention_mod,
        "cross_entropy_triton": cross_entropy,
        "linear_cross_entropy_triton": cross_entropy,
    }[name]
    calls = []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or "kernel")
    return calls


@pytest.mark.parametrize(
    "name, call",
    [
        ("rms_norm_triton", lambda b: dispatch.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, b)),
        (
            "attention_triton",
            lambda b: dispatch.attention(*[torch.ones(1, 1, 3, 32)] * 3, backend=b),
        ),
        (
            "cross_entropy_triton",
            lambda b: dispatch.cross_entropy(torch.zeros(2, 5), torch.tensor([1, 2]), backend=b),
        ),
        (
            "linear_cross_entropy_triton",
            lambda b: dispatch.linear_cross_entropy(
                torch.ones(2, 4), torch.ones(5, 4), torch.tensor([0, 1]), backend=b
            ),
        ),
    ],
)
def test_backends_route_to_kernel_or_reference(monkeypatch, name, call):
    calls = _spy(monkeypatch, name)
    assert call("triton") == "kernel" and calls == [name]
    for backend in ("torch", "auto"):  # CPU tensors: auto means the reference
        assert isinstance(call(backend), torch.Tensor)
    assert calls == [name]


def test_auto_keeps_unsupported_head_dims_on_reference(monkeypatch):
    calls = _spy(monkeypatch, "attention_triton")
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, t: "triton")  # as on CUDA
    q = torch.randn(1, 2, 5, 16)
    out = dispatch.attention(q, q, q, backend="auto")
    torch.testing.assert_close(out, attention_mod.attention_reference(q, q, q))
    assert calls == []
    dispatch.attention(*[torch.ones(1, 1, 3, 32)] * 3, backend="auto")
    assert calls == ["attention_triton"]
    dispatch.attention(*[torch.ones(1, 1, 3, 96)] * 3, backend="auto")  # padded tiles
    assert calls == ["attention_triton"] * 2
    monkeypatch.undo()
    with pytest.raises(ValueError, match="head dims"):  # an explicit triton says why not
        dispatch.attention(q, q, q, backend="triton")


def test_grouped_query_attention_through_every_backend():
    """k, v with fewer heads than q reach the reference and the kernels alike (the
    kernels here through the interpreter) and agree."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 32, generator=g)
    k, v = (torch.randn(1, 2, 6, 32, generator=g) for _ in range(2))
    lengths = torch.tensor([5])
    ref = dispatch.attention(q, k, v, lengths, backend="torch")
    assert ref.shape == q.shape
    torch.testing.assert_close(dispatch.attention(q, k, v, lengths, backend="auto"), ref)
    out = dispatch.attention(q, k, v, lengths, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_document_ids_reach_both_backends():
    """Packed rows: both backends mask by document and agree; the masked result differs
    from the unmasked one (the ids were not dropped on the way)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 32, generator=g) for _ in range(3))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5] * 9])
    ref = dispatch.attention(q, k, v, backend="torch", document_ids=ids)
    out = dispatch.attention(q, k, v, backend="triton", document_ids=ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    plain = dispatch.attention(q, k, v, backend="torch")
    torch.testing.assert_close(ref[1], plain[1])  # one document: same as no ids
    assert not torch.allclose(ref[0, :, 3:], plain[0, :, 3:])


def test_kernels_import_and_work_without_triton():
    """With triton unimportable, the package imports, auto/torch work, triton says why not."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
from tritonlm.kernels import dispatch
x = torch.randn(3, 8)
y = dispatch.rms_norm(x, torch.ones(8), 1e-6, backend="auto")
assert y.shape == x.shape
try:
    dispatch.rms_norm(x, torch.ones(8), 1e-6, backend="triton")
except RuntimeError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: backend 'triton' needs the triton package" in out.stdout
