"""Bit packing: the byte layout is part of the wire format, so it is pinned by hand-made examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec.bits import (
    pack_2bit,
    pack_bits,
    pack_positions,
    pack_uint,
    unpack_2bit,
    unpack_bits,
    unpack_uint,
)

FAST = settings(max_examples=40, deadline=None)


def test_pack_bits_is_little_endian_within_a_byte() -> None:
    bits = torch.zeros(3, 8, dtype=torch.bool)
    bits[0, 0] = True  # weight 1
    bits[1, 7] = True  # weight 128
    bits[2, [1, 3]] = True  # 2 + 8
    assert pack_bits(bits).tolist() == [[1], [128], [10]]


def test_pack_bits_pads_the_last_byte_with_zeros_and_keeps_rows_apart() -> None:
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[1, 1], [0, 0]]
    assert torch.equal(unpack_bits(packed, 9), bits)


def test_pack_uint_known_values() -> None:
    # 5 = 0b101 and 3 = 0b011 at width 3: bits 1,0,1,1,1,0 -> 0b011101 = 29.
    assert pack_uint(torch.tensor([[5, 3]]), 3).tolist() == [[29]]
    assert pack_uint(torch.tensor([[5, 3]]), 0).shape == (1, 0)
    assert unpack_uint(torch.zeros(2, 0, dtype=torch.uint8), 4, 0).tolist() == [[0] * 4] * 2


def test_pack_2bit_puts_the_first_code_in_the_low_bits() -> None:
    codes = torch.tensor([1, 2, 3, 0, 3])
    packed = pack_2bit(codes)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3]
    assert unpack_2bit(packed, 5).tolist() == [1, 2, 3, 0, 3]
    assert unpack_2bit(packed, 8).tolist() == [1, 2, 3, 0, 3, 0, 0, 0]


@FAST
@given(rows=st.integers(1, 5), nbits=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_bits_round_trip(rows: int, nbits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, nbits, generator=g) < 0.5
    packed = pack_bits(bits)
    assert packed.shape == (rows, -(-nbits // 8))
    assert torch.equal(unpack_bits(packed, nbits), bits)


@FAST
@given(rows=st.integers(1, 4), n=st.integers(1, 40), width=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_uint_round_trip(rows: int, n: int, width: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << width, (rows, n), generator=g)
    packed = pack_uint(values, width)
    assert packed.shape == (rows, -(-n * width // 8))
    assert torch.equal(unpack_uint(packed, n, width), values)
    # Value j occupies bits [j * width, (j + 1) * width) of the row's little-endian bit string.
    expected_bits = (values.unsqueeze(-1) >> torch.arange(width)) & 1
    assert torch.equal(unpack_bits(packed, n * width), expected_bits.reshape(rows, n * width).bool())


@FAST
@given(codes=st.lists(st.integers(0, 3), min_size=0, max_size=50))
def test_2bit_round_trip(codes: list[int]) -> None:
    packed = pack_2bit(torch.tensor(codes, dtype=torch.int64))
    assert packed.numel() == -(-len(codes) // 4)
    assert unpack_2bit(packed, len(codes)).tolist() == codes


@pytest.mark.parametrize("width", [1, 6, 8, 12])
def test_uint_rows_are_independent(width: int) -> None:
    values = torch.tensor([[(1 << width) - 1] * 3, [0] * 3])
    packed = pack_uint(values, width)
    assert bool((packed[1] == 0).all())
    assert torch.equal(unpack_uint(packed, 3, width), values)


@FAST
@given(rows=st.integers(1, 4), nbits=st.integers(1, 300), data=st.data())
def test_pack_positions_matches_a_bitmap(rows: int, nbits: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(1, min(nbits, 64)))
    pos = torch.stack(
        [
            torch.tensor(data.draw(st.lists(st.integers(0, nbits - 1), min_size=m, max_size=m, unique=True)))
            for _ in range(rows)
        ]
    )
    bitmap = torch.zeros(rows, nbits, dtype=torch.bool).scatter_(1, pos, True)
    assert torch.equal(pack_positions(pos, nbits), pack_bits(bitmap))
