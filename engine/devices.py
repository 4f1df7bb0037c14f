"""The one reading of a device name, for training, chat, serving and evaluation alike.

``auto`` is CUDA when there is a GPU and the CPU otherwise; ``cuda:N`` picks a GPU. A
device this machine cannot run is a :class:`DeviceError` naming the ``device`` field, so
every front end can say ``--device`` in one line before anything slow is loaded.

    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch

from .errors import EngineError

__all__ = ["DEVICE_CHOICES", "DeviceError", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(EngineError, ValueError):
    """A device name this machine cannot run; the message starts with the name."""


def resolve_device(name: str) -> torch.device:
    """The torch.device for ``name`` (see the module docstring), or :class:`DeviceError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        why = f"unknown device {name!r} (use {DEVICE_CHOICES})"
        raise DeviceError(why, field="device") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r} (use {DEVICE_CHOICES})", field="device")
    if device.type == "cpu" and device.index not in (None, 0):
        raise DeviceError(f"unknown device {name!r} (there is one cpu device: use cpu)",
                          field="device")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{name}: CUDA is not available on this machine", field="device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"{name}: this machine has {torch.cuda.device_count()} GPU(s)",
                          field="device")  # fmt: skip
    return device
