"""Hostile payloads: whatever bytes arrive, the codecs decode a sane update or raise a CodecError with a
documented code, never anything else.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import PAYLOAD_FORMAT_VERSION, DenseCodec, SparseLoCoCodec, SparseTensor
from protocol.errors import CodecError
from tests.helpers.codec_layout import HEADER, Spec, elias_fano, header_of, random_tensor, reframe, tensors_of

MIXED_SPEC: Spec = [("a", (130, 70)), ("b", (4097,)), ("c", (10,)), ("d", (64, 64)), ("e", (3, 5, 7))]
CODECS = [SparseLoCoCodec(), SparseLoCoCodec(k=16), DenseCodec("fp32"), DenseCodec("bf16")]
VALID = [
    c.encode({n: random_tensor(s, i) for i, (n, s) in enumerate(MIXED_SPEC)}, MIXED_SPEC, HEADER)[0]
    for c in CODECS
]


def check_sane(out: dict[str, SparseTensor], spec: Spec) -> None:
    """What a decode that did not raise must guarantee."""
    assert [n for n, _ in spec] == list(out)
    for name, shape in spec:
        t = out[name]
        n = math.prod(shape)
        assert bool(torch.isfinite(t.values).all())
        if t.indices is None:
            assert t.values.numel() == n
        else:
            assert t.indices.numel() == t.values.numel() == t.indices.unique().numel()
            assert t.indices.numel() == 0 or (int(t.indices.min()) >= 0 and int(t.indices.max()) < n)


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[int, bytes]:
    which = draw(st.integers(0, len(CODECS) - 1))
    data = bytearray(VALID[which])
    hlen = int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "append", "header", "body", "length"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "header" and len(data) > 8 + hlen:
            i = draw(st.integers(8, 8 + hlen - 1))
            data[i] = draw(st.sampled_from(b'0123456789{}[]",:-.eE nulltrue'))
        elif op == "body" and len(data) > 8 + hlen:
            i = draw(st.integers(8 + hlen, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "length" and len(data) >= 8:
            data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return which, bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=corruptions())
def test_corrupted_payloads_raise_only_codec_errors(case: tuple[int, bytes]) -> None:
    which, data = case
    try:
        _, out = CODECS[which].decode(data, MIXED_SPEC)
    except CodecError as e:
        assert e.code and isinstance(e.message, str)
        return
    check_sane(out, MIXED_SPEC)


@pytest.mark.parametrize("which", range(len(CODECS)))
@pytest.mark.parametrize("other", range(len(CODECS)))
def test_payload_of_another_codec_or_spec_is_refused(which: int, other: int) -> None:
    if which == other:
        # Same codec, different model: every length is derived from the receiver's spec.
        with pytest.raises(CodecError) as e:
            CODECS[which].decode(VALID[which], [*MIXED_SPEC, ("f", (64, 64))])
        assert e.value.code == "wrong_shape"
        return
    with pytest.raises(CodecError) as e:
        CODECS[other].decode(VALID[which], MIXED_SPEC)
    assert e.value.code in {"wrong_codec", "wrong_tensors", "wrong_dtype"}


def test_swapped_tensors_are_refused() -> None:
    t = tensors_of(VALID[0])
    t["idx"], t["val"] = t["val"], t["idx"]
    with pytest.raises(CodecError) as e:
        CODECS[0].decode(reframe(t, header_of(VALID[0])), MIXED_SPEC)
    assert e.value.code == "wrong_shape"


SQUARE: Spec = [("w", (64, 64))]
SQUARE_PAYLOAD = SparseLoCoCodec().encode({"w": random_tensor((64, 64), 5)}, SQUARE, HEADER)[0]


def edit_tensors(**changes: torch.Tensor | None) -> bytes:
    t = tensors_of(SQUARE_PAYLOAD)
    for name, value in changes.items():
        if value is None:
            del t[name]
        else:
            t[name] = value
    return reframe(t, header_of(SQUARE_PAYLOAD))


def edit_header(**changes: object) -> bytes:
    h = header_of(SQUARE_PAYLOAD)
    h.update(changes)
    return reframe(tensors_of(SQUARE_PAYLOAD), h)


def with_indices(indices: list[int]) -> bytes:
    return edit_tensors(idx=torch.tensor(list(elias_fano(indices)), dtype=torch.uint8))


def clear_upper_bit() -> bytes:
    idx = tensors_of(SQUARE_PAYLOAD)["idx"].clone()
    upper = idx[48:]
    byte = int(torch.nonzero(upper)[0])
    upper[byte] &= upper[byte] - 1  # clear the lowest set bit: 63 entries in the bitmap
    return edit_tensors(idx=idx)


def lut_with(value: float) -> bytes:
    lut = tensors_of(SQUARE_PAYLOAD)["lut"].clone()
    lut[0, 2] = value
    return edit_tensors(lut=lut)


HOSTILE = {
    "garbage": (lambda: b"\x00garbage" * 7, "malformed_payload"),
    "empty": (lambda: b"", "malformed_payload"),
    "truncated": (lambda: SQUARE_PAYLOAD[:-1], "malformed_payload"),
    "no metadata": (lambda: reframe(tensors_of(SQUARE_PAYLOAD), None), "malformed_payload"),
    "header not json": (lambda: reframe(tensors_of(SQUARE_PAYLOAD), "{not json"), "bad_header"),
    "header extra field": (lambda: edit_header(pickle="cos\nsystem"), "bad_header"),
    "header unknown codec": (lambda: edit_header(codec="zip"), "bad_header"),
    "header negative round": (lambda: edit_header(round=-1), "bad_header"),
    "header missing field": (
        lambda: reframe(tensors_of(SQUARE_PAYLOAD), {"format_version": 1, "codec": "sparseloco"}),
        "bad_header",
    ),
    "nan compute_s": (lambda: edit_header(stats={"compute_s": "NaN"}), "bad_header"),
    "format version": (
        lambda: edit_header(format_version=PAYLOAD_FORMAT_VERSION + 1),
        "wrong_format_version",
    ),
    "wrong k in header": (lambda: edit_header(k=32), "wrong_codec"),
    "wrong tile in header": (lambda: edit_header(tile=32), "wrong_codec"),
    "wrong codec in header": (lambda: edit_header(codec="dense_fp32"), "wrong_codec"),
    "missing tensor": (lambda: edit_tensors(dense=None), "wrong_tensors"),
    "extra tensor": (lambda: edit_tensors(evil=torch.zeros(1)), "wrong_tensors"),
    "idx dtype": (lambda: edit_tensors(idx=tensors_of(SQUARE_PAYLOAD)["idx"].to(torch.int8)), "wrong_dtype"),
    "lut dtype": (lambda: edit_tensors(lut=tensors_of(SQUARE_PAYLOAD)["lut"].double()), "wrong_dtype"),
    "dense dtype": (lambda: edit_tensors(dense=torch.zeros(0)), "wrong_dtype"),
    "idx too long": (lambda: edit_tensors(idx=torch.zeros(65, dtype=torch.uint8)), "wrong_shape"),
    "idx 2-d": (lambda: edit_tensors(idx=tensors_of(SQUARE_PAYLOAD)["idx"].view(8, 8)), "wrong_shape"),
    "val short": (lambda: edit_tensors(val=torch.zeros(15, dtype=torch.uint8)), "wrong_shape"),
    "lut 3 entries": (lambda: edit_tensors(lut=torch.zeros(1, 3)), "wrong_shape"),
    "dense extra": (lambda: edit_tensors(dense=torch.zeros(1, dtype=torch.float16)), "wrong_shape"),
    "nan in table": (lambda: lut_with(float("nan")), "non_finite"),
    "inf in table": (lambda: lut_with(float("inf")), "non_finite"),
    "bitmap holds 63": (clear_upper_bit, "wrong_k"),
    "index out of range": (lambda: with_indices([*range(63), 4096 + 5]), "index_out_of_range"),
    "unsorted indices": (lambda: with_indices([1, 0, *range(2, 64)]), "unsorted_indices"),
    "duplicate indices": (lambda: with_indices([0, 0, *range(1, 63)]), "unsorted_indices"),
    "duplicate across highs": (lambda: with_indices([*range(62), 4000, 4000]), "unsorted_indices"),
}


def test_hand_written_indices_decode_when_valid() -> None:
    indices = sorted({(i * 97) % 4096 for i in range(64)})
    assert len(indices) == 64
    _, out = SparseLoCoCodec().decode(with_indices(indices), SQUARE)
    assert out["w"].indices is not None
    assert out["w"].indices.tolist() == indices


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payloads_raise_codec_errors_with_codes(case: str) -> None:
    build, code = HOSTILE[case]
    with pytest.raises(CodecError) as e:
        SparseLoCoCodec().decode(build(), SQUARE)
    assert e.value.code == code, e.value.message


def test_dense_fp16_non_finite_is_refused() -> None:
    spec: Spec = [("w", (64, 64)), ("b", (8,))]
    payload, _ = SparseLoCoCodec().encode({"w": torch.randn(64, 64), "b": torch.ones(8)}, spec, HEADER)
    t = tensors_of(payload)
    t["dense"][3] = float("inf")
    with pytest.raises(CodecError) as e:
        SparseLoCoCodec().decode(reframe(t, header_of(payload)), spec)
    assert e.value.code == "non_finite"


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda t: {"dense": t["dense"][:-1]}, "wrong_shape"),
        (lambda t: {"dense": t["dense"].double()}, "wrong_dtype"),
        (lambda t: {"dense": torch.full_like(t["dense"], float("nan"))}, "non_finite"),
        (lambda t: {**t, "idx": torch.zeros(1, dtype=torch.uint8)}, "wrong_tensors"),
    ],
)
def test_dense_codec_hostile_payloads(edit: object, code: str) -> None:
    spec: Spec = [("w", (10, 10))]
    payload, _ = DenseCodec("fp32").encode({"w": torch.randn(10, 10)}, spec, HEADER)
    bad = reframe(edit(tensors_of(payload)), header_of(payload))  # type: ignore[operator]
    with pytest.raises(CodecError) as e:
        DenseCodec("fp32").decode(bad, spec)
    assert e.value.code == code


def test_dense_codec_refuses_a_mislabelled_payload() -> None:
    spec: Spec = [("w", (10, 10))]
    payload, _ = DenseCodec("fp32").encode({"w": torch.randn(10, 10)}, spec, HEADER)
    h = header_of(payload)
    h["codec"] = "dense_bf16"
    with pytest.raises(CodecError) as e:
        DenseCodec("fp32").decode(reframe(tensors_of(payload), h), spec)
    assert e.value.code == "wrong_codec"
