"""kernels/launch.py: every kernel launch happens inside the device guard, entered with the
device of the op's tensors (Triton launches on the *current* CUDA device otherwise).

There is no GPU here, so the guard is replaced by a recorder: it notes the device it was
entered with, and every Triton kernel of the three ops is wrapped to note which guard was
active when it launched. A launcher that forgets the guard (or passes another device)
records None (or that device) and fails.
"""

import contextlib

import pytest
import torch
import triton
from tritonlm.kernels import (
    _attention_bwd,
    _attention_fwd,
    attention,
    cross_entropy,
    launch,
    rmsnorm,
)


class _Recorder:
    def __init__(self):
        self.current = None
        self.launches: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def guard(self, device):
        previous, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = previous


class _Watched:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the active guard."""

    def __init__(self, name, kernel, recorder):
        self.name, self.kernel, self.recorder = name, kernel, recorder

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch_(*args, **kwargs):
            self.recorder.launches.append((self.name, self.recorder.current))
            return run(*args, **kwargs)

        return launch_

    def __call__(self, *args, **kwargs):  # a jitted helper called from inside a kernel
        return self.kernel(*args, **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    for mod in (rmsnorm, cross_entropy, attention):
        monkeypatch.setattr(mod, "on_device", rec.guard)
    for mod in (rmsnorm, cross_entropy, _attention_fwd, _attention_bwd):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.KernelInterface):
                monkeypatch.setattr(mod, name, _Watched(name, obj, rec))
    return rec


def _assert_all_guarded(rec, device, expected_kernels):
    names = {name for name, _ in rec.launches}
    assert expected_kernels <= names, f"kernels not launched: {expected_kernels - names}"
    for name, dev in rec.launches:
        assert dev == device, f"{name} launched under guard {dev}, tensors on {device}"


def test_rmsnorm_launches_inside_the_guard(recorder):
    x = torch.randn(5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    rmsnorm.rms_norm_triton(x, w).sum().backward()
    _assert_all_guarded(recorder, x.device, {"rms_norm_fwd_kernel", "rms_norm_bwd_kernel"})


def test_cross_entropy_and_linear_launch_inside_the_guard(recorder):
    logits = torch.randn(4, 30, requires_grad=True)
    cross_entropy.cross_entropy_triton(logits, torch.tensor([1, 2, -100, 29])).backward()
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    t = torch.tensor([0, 19, -100, 5, 5, 1])
    cross_entropy.linear_cross_entropy_triton(h, w, t).backward()
    _assert_all_guarded(recorder, logits.device, {"_cross_entropy_fwd_kernel"})


def test_attention_launches_inside_the_guard(recorder):
    q, k, v = (torch.randn(1, 2, 16, 32, requires_grad=True) for _ in range(3))
    attention.attention_triton(q, k, v).sum().backward()
    kernels = {name for name, _ in recorder.launches}
    assert len(kernels) >= 3  # forward, preprocess and the backward kernels
    _assert_all_guarded(recorder, q.device, set())


def test_on_device_enters_torch_cuda_device_for_cuda_only(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with launch.on_device(torch.device("cuda", 1)):
        pass
    with launch.on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_dtype_tables_and_row_views():
    assert launch.FLOAT_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert [launch.triton_type(d) for d in launch.FLOAT_DTYPES] == ["fp32", "fp16", "bf16"]
    with pytest.raises(ValueError, match="no Triton kernel type"):
        launch.triton_type(torch.float64)
    x = torch.randn(2, 3, 10)[..., 1:8]  # a column slice: rows are strided
    rows = launch.as_rows(x)
    assert rows.shape == (6, 7) and rows.stride(-1) == 1 and torch.equal(rows, x.reshape(6, 7))
    assert launch.arch(torch.device("cpu")) == "cpu" and launch.num_sms("cpu") >= 1


def test_kernel_modules_share_one_dtype_table():
    """No module keeps a copy of its own: the checks name the one table."""
    for mod in (rmsnorm, cross_entropy, attention):
        copies = [v for v in vars(mod).values() if isinstance(v, tuple) and torch.float16 in v]
        assert all(c is launch.FLOAT_DTYPES for c in copies), mod.__name__
