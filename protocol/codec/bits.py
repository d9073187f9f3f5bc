"""Vectorised bit packing: the building blocks of the codec's wire format.

Bits are little-endian within a byte (bit j of a byte has weight 2**j); rows are packed independently.
"""

from __future__ import annotations

import math

import torch

_SHIFTS_CACHE: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    key = (device, n)
    t = _SHIFTS_CACHE.get(key)
    if t is None:
        t = _SHIFTS_CACHE[key] = torch.arange(n, device=device, dtype=torch.int64)
    return t


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(rows, nbits) bool -> (rows, ceil(nbits / 8)) uint8."""
    rows, nbits = bits.shape
    pad = (-nbits) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.bitwise_left_shift(1, _arange(8, bits.device)).to(torch.uint8)
    grouped = bits.view(rows, bits.shape[1] // 8, 8).to(torch.uint8) * weights  # (rows, nbytes, 8)
    return grouped.sum(dim=2, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, nbits: int) -> torch.Tensor:
    """(rows, nbytes) uint8 -> (rows, nbits) bool."""
    rows = data.shape[0]
    shifts = _arange(8, data.device).to(torch.uint8)
    bits = torch.bitwise_right_shift(data.unsqueeze(-1), shifts) & 1  # (rows, nbytes, 8)
    return bits.view(rows, data.shape[1] * 8)[:, :nbits].bool()


def _group(n: int, width: int) -> int:
    """Values per whole-byte group: the smallest g with g * width a multiple of 8, when it divides n."""
    g = 8 // math.gcd(width, 8)
    return g if n % g == 0 and g * width <= 56 else 0


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, n) integers below 2**width -> (rows, ceil(n * width / 8)) uint8.

    Value j of a row occupies bits [j * width, (j + 1) * width) of the row's little-endian bit string.
    """
    rows, n = values.shape
    if width == 0:
        return torch.empty(rows, 0, dtype=torch.uint8, device=values.device)
    g = _group(n, width)
    if not g:  # general path: one bool per bit
        bits = torch.bitwise_right_shift(values.unsqueeze(-1), _arange(width, values.device)) & 1
        return pack_bits(bits.view(rows, n * width).bool())
    nbytes = g * width // 8
    grouped = values.view(rows, n // g, g) << (_arange(g, values.device) * width)  # disjoint bit ranges
    word = grouped.sum(dim=2, keepdim=True)  # (rows, n / g, 1), at most 64 bits
    out = torch.bitwise_right_shift(word, _arange(nbytes, values.device) * 8) & 0xFF
    return out.to(torch.uint8).view(rows, n // g * nbytes)


def unpack_uint(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of pack_uint: (rows, nbytes) uint8 -> (rows, n) int64."""
    rows = data.shape[0]
    if width == 0:
        return torch.zeros(rows, n, dtype=torch.int64, device=data.device)
    g = _group(n, width)
    if not g:
        bits = unpack_bits(data, n * width).view(rows, n, width).to(torch.int64)
        return (bits << _arange(width, data.device)).sum(dim=2)
    nbytes = g * width // 8
    parts = data.view(rows, n // g, nbytes).to(torch.int64) << (_arange(nbytes, data.device) * 8)
    word = parts.sum(dim=2, keepdim=True)  # (rows, n / g, 1)
    values = torch.bitwise_right_shift(word, _arange(g, data.device) * width) & ((1 << width) - 1)
    return values.view(rows, n)


def pack_positions(pos: torch.Tensor, nbits: int) -> torch.Tensor:
    """Bitmaps with ones at ``pos`` ((rows, m), distinct per row, below nbits) -> (rows, nbits/8) uint8."""
    rows = pos.shape[0]
    out = torch.zeros(rows, -(-nbits // 8), dtype=torch.int32, device=pos.device)
    out.scatter_add_(1, pos >> 3, (1 << (pos & 7)).to(torch.int32))  # distinct bits: add is or
    return out.to(torch.uint8)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes in 0..3 -> uint8, four to a byte (first code in the low bits)."""
    n = codes.numel()
    c = codes.reshape(-1).to(torch.uint8)
    pad = (-n) % 4
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_2bit(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_2bit: the first n codes as int64."""
    d = data.reshape(-1, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=data.device)
    return (torch.bitwise_right_shift(d, shifts) & 3).reshape(-1)[:n].to(torch.int64)
