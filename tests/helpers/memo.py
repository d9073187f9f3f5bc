"""Results a test computes that other tests compute again from the same inputs, kept on disk for the session
and shared by its workers: one torch thread makes them the same bit for bit, and the key is every input."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ENV = "GRADPOOL_TEST_MEMO"  # the session's folder (tests/conftest.py sets it)


def memoised(
    name: str, inputs: tuple[str | float, ...], compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()``, or what it returned before in this session for the same ``inputs`` (digests of the
    tensors it reads, and plain values)."""
    folder = os.environ.get(ENV)
    if not folder:
        return compute()
    digest = hashlib.sha256(repr(inputs).encode()).hexdigest()
    path = Path(folder) / f"{name}-{digest}.safetensors"
    if path.exists():
        return load_file(path)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # another worker may write the same key
    save_file({n: t.contiguous() for n, t in result.items()}, partial)
    partial.replace(path)
    return result
