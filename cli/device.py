"""One reading of --device and --backend for every command that runs a model.

``auto`` is CUDA when there is a GPU and the CPU otherwise; ``cuda:N`` picks a GPU; the
backend choices are the kernels' own (``tritonlm.kernels.dispatch.BACKENDS``). A device
or backend this machine cannot run is one line before anything slow is loaded.
"""

from __future__ import annotations

import argparse

from .common import UsageError

DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: auto, a GPU when there is one)"  # engine.devices


def add_device_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """--device and --backend, the same help and choices in every command."""
    from tritonlm.kernels.dispatch import BACKENDS

    group.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    group.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="kernels: triton on CUDA, the torch reference elsewhere "
                       "(default: auto)")  # fmt: skip


def resolve_device(name: str):
    """The torch.device for a --device value (engine.devices), or UsageError naming the flag."""
    from tritonlm.engine.devices import DeviceError
    from tritonlm.engine.devices import resolve_device as resolve

    try:
        return resolve(name)
    except DeviceError as e:
        text = str(e)  # "NAME: why" keeps the name next to the flag, else "--device: why"
        sep = " " if text.startswith(f"{name}:") else ": "
        raise UsageError(f"--device{sep}{text}") from None


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
