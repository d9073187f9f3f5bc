"""An independent model of the update codec's wire format, and the surgery the codec tests do on payloads.

The chunk geometry and the Elias-Fano layout are re-implemented here from the codec's documentation, so
the tests pin the wire format instead of echoing the implementation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, SparseLoCoCodec, SparseTensor

HEADER = PayloadHeader(format_version=PAYLOAD_FORMAT_VERSION, codec="sparseloco", round=3, base_version=2)
TILE = 64
CHUNK = TILE * TILE

Spec = list[tuple[str, tuple[int, ...]]]


# -- an independent model of the layout -------------------------------------------------------------------
def chunk_of(shape: tuple[int, ...], tile: int = TILE) -> np.ndarray:
    """The chunk number of every element, in flat order: tiles for big matrices, else runs of tile**2."""
    n = math.prod(shape)
    flat = np.arange(n)
    if len(shape) == 2 and min(shape) >= tile:
        r, c = np.divmod(flat, shape[1])
        return (r // tile) * (-(-shape[1] // tile)) + c // tile
    return flat // (tile * tile)


def full_chunks(shape: tuple[int, ...], k: int, tile: int = TILE) -> bool:
    """Every chunk holds at least k real elements (no zero padding gets selected)."""
    return bool(np.bincount(chunk_of(shape, tile)).min() >= k)


def is_valid_topk(x: np.ndarray, kept: np.ndarray, shape: tuple[int, ...], k: int, tile: int = TILE) -> bool:
    """kept holds min(k, m) elements of each chunk of m, none smaller in magnitude than any left out."""
    chunks = chunk_of(shape, tile)
    mag = np.abs(x.reshape(-1))
    chosen = np.zeros(mag.size, dtype=bool)
    chosen[kept] = True
    for cid in range(chunks.max() + 1):
        members = chunks == cid
        inside, outside = mag[members & chosen], mag[members & ~chosen]
        if inside.size != min(k, int(members.sum())):
            return False
        if outside.size and inside.min() < outside.max():
            return False
    return True


def pack_lsb_first(bits: list[int]) -> bytes:
    bits = bits + [0] * (-len(bits) % 8)
    return bytes(sum(b << j for j, b in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8))


def elias_fano(indices: list[int], k: int = 64, chunk: int = CHUNK) -> bytes:
    """One chunk as documented: low bits of every index, then the upper bitmap (bit high_i + i set)."""
    low = math.floor(math.log2(chunk / k))
    high = [0] * (k + ((chunk - 1) >> low) + 1)
    for i, v in enumerate(indices):
        high[(v >> low) + i] = 1
    lows = [(v >> j) & 1 for v in indices for j in range(low)]
    return pack_lsb_first(lows) + pack_lsb_first(high)


# -- payload surgery --------------------------------------------------------------------------------------
def tensors_of(payload: bytes) -> dict[str, torch.Tensor]:
    return dict(st_load(payload))


def header_of(payload: bytes) -> dict[str, object]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(json.loads(payload[8 : 8 + n])["__metadata__"]["gradpool"])  # type: ignore[no-any-return]


def reframe(tensors: dict[str, torch.Tensor], header: dict[str, object] | str | None) -> bytes:
    meta = None if header is None else {"gradpool": header if isinstance(header, str) else json.dumps(header)}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def assert_same(sent: SparseTensor, received: SparseTensor, shape: tuple[int, ...]) -> None:
    """The encoder's record of a tensor is bit for bit what the decoder returns."""
    if received.indices is None:
        assert sent.indices is None
    else:
        assert sent.indices is not None and torch.equal(sent.indices, received.indices)
    assert sent.values.dtype == received.values.dtype == torch.float32
    assert torch.equal(sent.values.view(torch.int32), received.values.view(torch.int32))
    assert torch.equal(sent.to_dense(shape).view(torch.int32), received.to_dense(shape).view(torch.int32))


def random_tensor(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def sparse_index(spec: Spec, codec: SparseLoCoCodec, name: str) -> int:
    """Position of ``name`` among the spec's sparse tensors (its row in the value table)."""
    return [n for n, s in spec if not codec.is_dense(s)].index(name)
