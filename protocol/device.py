"""Where a role runs its forward passes: the device (``auto``: CUDA when present, else the CPU) and the
precision evaluation measures losses in. Training and the canonical parameters never depend on either."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def device_name(requested: str) -> str:
    """``requested`` if it names a device gradpool can run on (``auto``, ``cpu``, ``cuda``, ``cuda:N``),
    whether or not this machine has it; else a ValueError that says why."""
    if requested == "auto":
        return requested
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r}: only cpu and cuda are supported")
    return requested


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; otherwise the device named (``cpu``, ``cuda``,
    ``cuda:1``, ...). A ValueError, that says why, for a name torch does not know or a CUDA device this
    machine does not have."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name(requested))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {requested!r}: this machine has {count} CUDA devices")
    return device


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The dtype evaluation's forward passes run in under autocast: bf16 on CUDA for ``auto``, none (fp32)
    on CPU; ``fp32`` never, ``bf16`` on any device. Only losses are measured this way: training, the
    canonical parameters and everything a version's hash follows from stay in fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def forward_mode(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
