"""One reading of --device and --backend for every command that runs a model.

``auto`` is CUDA when there is a GPU and the CPU otherwise; ``cuda:N`` picks a GPU; the
backend choices are the kernels' own (``tritonlm.kernels.dispatch.BACKENDS``). A device
or backend this machine cannot run is one line before anything slow is loaded.
"""

from __future__ import annotations

import argparse

from .common import UsageError

DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: auto, a GPU when there is one)"


def add_device_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """--device and --backend, the same help and choices in every command."""
    from tritonlm.kernels.dispatch import BACKENDS

    group.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    group.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="kernels: triton on CUDA, the torch reference elsewhere "
                       "(default: auto)")  # fmt: skip


def resolve_device(name: str):
    """The torch.device for a --device value, or UsageError naming the flag."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: unknown device {name!r} (use {DEVICE_HELP})") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: unsupported device {name!r} (use {DEVICE_HELP})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device: unknown device {name!r} (there is one cpu device: use cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_backend(backend: str, device) -> None:
    """UsageError when --backend cannot run on ``device`` (e.g. triton on a CPU without
    TRITON_INTERPRET=1)."""
    from tritonlm.kernels.dispatch import check_backend as check

    try:
        check(backend, device)
    except ValueError as e:
        raise UsageError(f"--backend {backend}: {e}") from None


def device_and_backend(args: argparse.Namespace):
    """``args.device`` resolved and ``args.backend`` checked against it."""
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    return device
