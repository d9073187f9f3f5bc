"""Elias-Fano coding of the sorted indices within chunks, a batch of chunks with the same count at a time:
the index part of SparseLoCo's wire format (the same k in every chunk of an upload, a count per chunk in a
published update, ``protocol/codec/counted.py``).

Each of k strictly increasing indices below ``chunk`` is cut into ``l = floor(log2(chunk / k))`` low bits,
packed, and a high part ``i >> l``, sent as a bitmap of ``k + ((chunk - 1) >> l) + 1`` bits with a one at
``(i >> l) + j`` for the j-th index. At k=64, chunk=4096 that is exactly 8 bits an index.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from protocol.codec.bits import pack_positions, pack_uint, unpack_bits, unpack_uint
from protocol.errors import CodecError


def ef_params(chunk: int, k: int) -> tuple[int, int]:
    """Elias-Fano low-bit width and upper-bitmap length for k sorted values below ``chunk``."""
    low = max(0, math.floor(math.log2(chunk / k)))
    return low, k + ((chunk - 1) >> low) + 1


def ef_bytes(chunk: int, k: int) -> tuple[int, int]:
    """Bytes of a chunk's low bits and of its upper bitmap, each rounded up to whole bytes."""
    low, high = ef_params(chunk, k)
    return -(-k * low // 8), -(-high // 8)


def ef_bytes_by_count(chunk: int) -> torch.Tensor:
    """``sum(ef_bytes(chunk, k))`` for every k in 0 .. chunk at once (0 for k = 0): the low-bit width
    ``floor(log2(chunk / k))`` is the number of powers of two, from 2, at most ``chunk // k``."""
    k = torch.arange(1, chunk + 1, dtype=torch.int64)
    low = sum(((chunk // k) >= 1 << j).long() for j in range(1, chunk.bit_length()))
    high = k + ((chunk - 1) >> low) + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), (k * low + 7) // 8 + (high + 7) // 8])


def ef_encode(idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """(rows, k) strictly increasing indices below ``chunk`` -> (rows, sum(ef_bytes)) uint8."""
    k = idx.shape[1]
    low, high = ef_params(chunk, k)
    pos = (idx >> low) + torch.arange(k, device=idx.device)  # strictly increasing
    return torch.cat([pack_uint(idx & ((1 << low) - 1), low), pack_positions(pos, high)], dim=1)


def ef_decode(data: torch.Tensor, chunk: int, k: int, where: Callable[[torch.Tensor], str]) -> torch.Tensor:
    """Inverse of ``ef_encode`` on hostile input: (rows, sum(ef_bytes)) uint8 -> (rows, k) indices, each
    row strictly increasing and below ``chunk``. ``where(bad)`` names the place of the bad rows (a bool
    mask) in the CodecError raised for any row that is not that."""
    rows = data.shape[0]
    low, high = ef_params(chunk, k)
    low_bytes = -(-k * low // 8)
    low_part = unpack_uint(data[:, :low_bytes], k, low)  # (rows, k)
    upper = unpack_bits(data[:, low_bytes:], high)  # (rows, high)
    bad = upper.sum(dim=1) != k
    if bool(bad.any()):
        raise CodecError(f"{where(bad)}: an index bitmap does not hold exactly k={k} entries", code="wrong_k")
    pos = upper.nonzero()[:, 1].view(rows, k)
    idx = ((pos - torch.arange(k, device=data.device)) << low) | low_part
    bad = (idx >= chunk).any(dim=1)
    if bool(bad.any()):
        raise CodecError(f"{where(bad)}: an index lies outside its chunk", code="index_out_of_range")
    if k > 1:
        bad = (idx[:, 1:] <= idx[:, :-1]).any(dim=1)
        if bool(bad.any()):
            raise CodecError(
                f"{where(bad)}: indices are not strictly increasing within a chunk", code="unsorted_indices"
            )
    return idx
