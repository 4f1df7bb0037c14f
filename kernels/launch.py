"""What every kernel launcher shares: the dtype tables, the device guard, row views and
the GPU facts launch configs depend on.

Why a module of its own: Triton launches on the *current* CUDA device, not on the device
of the tensors it is given, so a model on ``cuda:1`` in a process whose current device is
``cuda:0`` would run its kernels on the wrong GPU (or fault). Every launcher enters
:func:`on_device` with its tensors' device; one helper keeps the three ops agreeing.

Example::

    with on_device(x.device):
        kernel[grid](x, ...)
"""

from __future__ import annotations

import contextlib
import functools

import torch

# The floating dtypes every kernel accepts, and Triton's name for each (in signatures and
# config-table keys).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def triton_type(dtype: torch.dtype) -> str:
    """Triton's signature name for a torch dtype: torch.bfloat16 -> "bf16"."""
    try:
        return TRITON_TYPES[dtype]
    except KeyError:
        raise ValueError(f"no Triton kernel type for {dtype}") from None


def on_device(device: torch.device):
    """Context that makes `device` the current CUDA device for a launch (a no-op for
    anything that is not CUDA: the CPU interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> a 2-D [rows, n] view (or copy) whose last dimension is contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@functools.cache
def _cuda_facts(index: int) -> tuple[int, str]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, f"sm{props.major}{props.minor}"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 "programs in flight" on the CPU (the
    interpreter), so persistent grids still split work across several programs there."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def arch(device: torch.device) -> str:
    """The config-table architecture key: "sm90" for an H100/H200, "sm80" for an A100,
    "cpu" for the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())[1]
