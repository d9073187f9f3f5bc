"""Results a test computes that other tests compute again from the same inputs, kept on disk for the session
and shared by its workers: one torch thread makes them the same bit for bit, and the key is every input."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ENV = "GRADPOOL_TEST_MEMO"  # the session's folder (tests/conftest.py sets it)


def key(*parts: Mapping[str, torch.Tensor] | torch.Tensor | str | float) -> str:
    """A digest of tensors (by name, dtype, shape and bytes), tensor maps and plain values."""
    h = hashlib.sha256()
    for part in parts:
        tensors = part if isinstance(part, Mapping) else {"": part} if isinstance(part, torch.Tensor) else {}
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if not tensors:
            h.update(f"{type(part).__name__}:{part!r}|".encode())
    return h.hexdigest()


def memoised(
    name: str, digest: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()``, or what it returned before for this digest in this session."""
    folder = os.environ.get(ENV)
    if not folder:
        return compute()
    path = Path(folder) / f"{name}-{digest}.safetensors"
    if path.exists():
        return load_file(path)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # another worker may write the same key
    save_file({n: t.contiguous() for n, t in result.items()}, partial)
    partial.replace(path)
    return result
