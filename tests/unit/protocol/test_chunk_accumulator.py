"""Accumulating SparseLoCo payloads in the codec's chunk layout gives the same aggregate as decoding
each to parameter coordinates."""

from __future__ import annotations

import pytest
import torch

from protocol.codec import PayloadHeader, SparseLoCoCodec, make_codec
from protocol.codec.accumulate import FlatAccumulator
from protocol.codec.chunk_accumulator import ChunkAccumulator

SPEC = [
    ("tiled", (128, 192)),
    ("edges", (100, 130)),
    ("flat", (5000,)),
    ("short", (70,)),
    ("tiny", (5,)),
    ("cube", (3, 7, 50)),
]
HEADER = PayloadHeader(format_version=1, codec="sparseloco", round=0, base_version=0)


@pytest.mark.parametrize("k", [16, 64])
def test_chunk_accumulator_equals_the_flat_aggregate(k: int) -> None:
    codec = SparseLoCoCodec(k=k)
    g = torch.Generator().manual_seed(k)
    payloads = [
        codec.encode({n: torch.randn(s, generator=g) * (i + 1) for n, s in SPEC}, SPEC, HEADER)[0]
        for i in range(3)
    ]
    scales = [1.0, 0.5, 0.25]
    acc = ChunkAccumulator(codec, SPEC)
    for payload, scale in zip(payloads, scales, strict=True):
        acc.add(payload, scale)
    chunked = acc.mean()
    decoded = [codec.decode(p, SPEC)[1] for p in payloads]
    for name, shape in SPEC:
        assert chunked[name].shape == shape
    flat = FlatAccumulator(SPEC, max_contributors=3)
    for update, scale in zip(decoded, scales, strict=True):
        flat.add(update, scale)
    reference = flat.mean()
    for name, _ in SPEC:
        assert torch.allclose(chunked[name], reference[name], rtol=1e-6, atol=1e-9), name


def test_more_than_255_contributors_is_refused() -> None:
    codec = SparseLoCoCodec()
    acc = ChunkAccumulator(codec, [("w", (10,))])
    acc.contributors = 255
    with pytest.raises(ValueError, match="255"):
        acc.add(b"", 1.0)


@pytest.mark.parametrize("make", ["chunk", "flat"])
def test_more_contributors_than_a_byte_counts_need_a_wider_count(make: str) -> None:
    """Each accumulator picks its count type from the number of contributors and enforces its limit."""
    codec = SparseLoCoCodec(k=16)
    spec = [("w", (70,))]
    payload = codec.encode({"w": torch.arange(70.0)}, spec, HEADER)[0]
    stored = codec.examine(payload, spec).stored
    acc = (
        codec.accumulator(spec, 300)
        if make == "chunk"
        else FlatAccumulator(spec, max_contributors=300, decode=lambda b: codec.decode(b, spec)[1])
    )
    assert acc.count.dtype == torch.int32
    for _ in range(300):
        acc.add_stored(stored if make == "chunk" else payload)
    mean = acc.mean()["w"]
    assert torch.allclose(mean, codec.decode(payload, spec)[1]["w"].to_dense((70,)), rtol=1e-6)


@pytest.mark.parametrize("name", ["sparseloco", "dense_fp32"])
def test_a_payload_unpacked_again_is_the_form_intake_would_have_kept(name: str) -> None:
    """``unpack`` (a coordinator whose blobs are in a bucket keeps no unpacked form) gives what ``examine``
    gives, and the aggregate of either is the payload's."""
    codec = make_codec(name, 16)
    g = torch.Generator().manual_seed(3)
    header = HEADER.model_copy(update={"codec": name})
    payload = codec.encode({n: torch.randn(s, generator=g) for n, s in SPEC}, SPEC, header)[0]
    assert codec.unpack(payload, SPEC) == codec.examine(payload, SPEC).stored
    acc = codec.accumulator(SPEC)
    acc.add_stored(codec.unpack(payload, SPEC))
    mean, decoded = acc.mean(), codec.decode(payload, SPEC)[1]
    for n, shape in SPEC:
        assert torch.allclose(mean[n], decoded[n].to_dense(shape), rtol=1e-6, atol=1e-9), n
