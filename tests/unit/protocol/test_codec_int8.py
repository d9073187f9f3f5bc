"""The int8 baseline codec: one absmax scale per 4096 elements, through the same interface."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from protocol.codec import Int8Codec, PayloadHeader, make_codec
from protocol.errors import CodecError

HEADER = PayloadHeader(format_version=1, codec="int8", round=3, base_version=2)
SPEC = [("a", (300, 200)), ("b", (70,)), ("c", (5000,))]


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SPEC}


def test_round_trip_is_within_half_a_step_per_chunk_and_matches_decoded() -> None:
    codec = make_codec("int8")
    x = tensors()
    payload, decoded = codec.encode(x, SPEC, HEADER)
    header, out = codec.decode(payload, SPEC)
    assert header.round == 3 and header.base_version == 2 and header.codec == "int8"
    for name, shape in SPEC:
        dense = out[name].to_dense(shape)
        assert torch.equal(dense, decoded[name].to_dense(shape))
        flat = x[name].reshape(-1)
        for chunk_x, chunk_d in zip(flat.split(4096), dense.reshape(-1).split(4096), strict=True):
            step = float(chunk_x.abs().max()) / 127
            assert float((chunk_x - chunk_d).abs().max()) <= step / 2 + 1e-7
    total = sum(t.numel() for t in x.values())
    assert 3.9 < total * 4 / len(payload) < 4.0  # about 4x smaller than fp32


def test_bf16_input_and_an_all_zero_tensor_encode() -> None:
    codec = Int8Codec()
    x = {n: t.bfloat16() for n, t in tensors(1).items()}
    x["b"] = torch.zeros(70, dtype=torch.bfloat16)
    payload, _ = codec.encode(x, SPEC, HEADER)
    _, out = codec.decode(payload, SPEC)
    assert bool((out["b"].values == 0).all())


def _payload(**replace: torch.Tensor) -> bytes:
    codec = Int8Codec()
    payload, _ = codec.encode(tensors(), SPEC, HEADER)
    parts = load(payload)
    parts.update(replace)
    return save(parts, metadata={"gradpool": HEADER.model_dump_json()})


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"scale": torch.full((15 + 1 + 2,), float("nan"))}, "non_finite"),
        ({"scale": -torch.ones(15 + 1 + 2)}, "non_finite"),
        ({"q": torch.zeros(10, dtype=torch.int8)}, "wrong_shape"),
        ({"q": torch.zeros(60000 + 70 + 5000, dtype=torch.int16)}, "wrong_dtype"),
        ({"extra": torch.zeros(1)}, "wrong_tensors"),
    ],
)
def test_hostile_payloads_raise_codec_errors(change: dict[str, torch.Tensor], code: str) -> None:
    with pytest.raises(CodecError) as err:
        Int8Codec().decode(_payload(**change), SPEC)
    assert err.value.code == code


def test_a_sparseloco_payload_is_refused_by_the_int8_codec() -> None:
    sparse = make_codec("sparseloco")
    payload, _ = sparse.encode(tensors(), SPEC, HEADER.model_copy(update={"codec": "sparseloco"}))
    with pytest.raises(CodecError):
        Int8Codec().decode(payload, SPEC)
