"""The update codecs: exact index round trips, 2-bit value tables, payload size and edge cases.

The wire format is checked against an independent model of it (tests/helpers/codec_layout.py), so the
tests pin the format instead of echoing the implementation. Hostile payloads: test_codec_hostile.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    CODEC_NAMES,
    PAYLOAD_FORMAT_VERSION,
    DenseCodec,
    PayloadHeader,
    PayloadStats,
    SparseLoCoCodec,
    make_codec,
    quantize_2bit,
)
from protocol.codec.elias_fano import ef_params
from tests.helpers.codec_layout import (
    HEADER,
    Spec,
    assert_same,
    chunk_of,
    elias_fano,
    full_chunks,
    is_valid_topk,
    random_tensor,
    sparse_index,
    tensors_of,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies -------------------------------------------------------------------------------------------
tiled_shapes = st.tuples(st.integers(64, 200), st.integers(64, 200))
thin_shapes = st.tuples(st.integers(1, 63), st.integers(1, 300))
flat_shapes = st.tuples(st.integers(1, 9000))
cube_shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40))
shapes = st.one_of(tiled_shapes, thin_shapes, flat_shapes, cube_shapes, st.tuples(st.integers(1, 48)))
ks = st.sampled_from([16, 64, 128])
tiles_and_ks = st.sampled_from([(64, 16), (64, 64), (64, 128), (8, 4), (8, 16), (32, 64), (128, 64)])
scales = st.sampled_from([1e-6, 1e-2, 1.0, 300.0])


# -- construction and geometry ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 6, 4100])
def test_sparse_codec_rejects_bad_k(k: int) -> None:
    with pytest.raises(ValueError):
        SparseLoCoCodec(k=k)


def test_make_codec_names() -> None:
    assert isinstance(make_codec("sparseloco", k=16), SparseLoCoCodec)
    assert make_codec("sparseloco", k=16).k == 16  # type: ignore[union-attr]
    assert make_codec("dense_fp32").name == "dense_fp32"
    assert make_codec("dense_bf16").name == "dense_bf16"
    with pytest.raises(ValueError):
        make_codec("gzip")  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "low_bits", "bytes_per_chunk"), [(16, 8, 16 + 4 + 4), (64, 6, 48 + 16 + 16)])
def test_chunk_size_follows_elias_fano(k: int, low_bits: int, bytes_per_chunk: int) -> None:
    codec = SparseLoCoCodec(k=k)
    assert ef_params(64 * 64, k)[0] == low_bits
    x = random_tensor((128, 192), 0)  # 2 x 3 tiles
    payload, _ = codec.encode({"w": x}, [("w", (128, 192))], HEADER)
    t = tensors_of(payload)
    assert t["idx"].numel() + t["val"].numel() == 6 * bytes_per_chunk
    assert t["val"].numel() == 6 * k // 4


def test_tiny_tensors_go_dense_exactly_when_fp16_is_no_larger() -> None:
    codec = SparseLoCoCodec(k=64)  # one sparse chunk: 48 + 16 + 16 bytes + 16 for the table = 96
    assert codec.is_dense((48,)) and codec.is_dense((6, 8))
    assert not codec.is_dense((49,)) and not codec.is_dense((7, 7))
    assert not codec.is_dense((128,))


def test_index_bytes_match_a_hand_written_elias_fano_coder() -> None:
    x = random_tensor((64, 64), 1)
    payload, _ = SparseLoCoCodec().encode({"w": x}, [("w", (64, 64))], HEADER)
    top = sorted(x.reshape(-1).abs().topk(64).indices.tolist())
    assert bytes(tensors_of(payload)["idx"].tolist()) == elias_fano(top)


def test_tile_order_is_row_major_over_tiles() -> None:
    # One large value per tile; the first chunk's indices must live in tile (0, 0), the second in (0, 1).
    x = torch.zeros(128, 128)
    x[:64, :64] = 1.0
    x[:64, 64:] = 2.0
    x[64:, :] = 3.0
    x[5, 7], x[9, 70], x[100, 3], x[120, 120] = 50.0, 60.0, 70.0, 80.0
    codec = SparseLoCoCodec(k=4)
    _, out = codec.decode(codec.encode({"w": x}, [("w", (128, 128))], HEADER)[0], [("w", (128, 128))])
    idx = out["w"].indices
    assert idx is not None and idx.numel() == 16
    rows, cols = idx // 128, idx % 128
    tiles = ((rows // 64) * 2 + cols // 64).tolist()
    assert tiles == sorted(tiles) and tiles[::4] == [0, 1, 2, 3]
    assert {5 * 128 + 7, 9 * 128 + 70, 100 * 128 + 3, 120 * 128 + 120} <= set(idx.tolist())


# -- round trips ------------------------------------------------------------------------------------------
@FAST
@given(shape=shapes, tile_k=tiles_and_ks, seed=st.integers(0, 2**31 - 1), scale=scales)
def test_indices_round_trip_exactly_and_encoder_matches_decoder(
    shape: tuple[int, ...], tile_k: tuple[int, int], seed: int, scale: float
) -> None:
    tile, k = tile_k
    codec = SparseLoCoCodec(k=k, tile=tile)
    x = random_tensor(shape, seed, scale)
    spec = [("w", shape)]
    payload, decoded = codec.encode({"w": x}, spec, HEADER)
    _, out = codec.decode(payload, spec)
    st_out = out["w"]
    # The encoder's view of the payload is bit-for-bit what the receiver gets.
    assert_same(decoded["w"], st_out, shape)
    if codec.is_dense(shape):
        assert st_out.indices is None
        assert torch.equal(st_out.values, x.reshape(-1).half().float())
        return
    assert st_out.indices is not None
    kept = st_out.indices.numpy()
    assert len(np.unique(kept)) == kept.size
    assert kept.min() >= 0 and kept.max() < math.prod(shape)
    assert is_valid_topk(x.numpy(), kept, shape, k, tile)
    # Every decoded value is an entry of this tensor's 4-entry table.
    lut = tensors_of(payload)["lut"][0]
    assert bool(torch.isin(st_out.values, lut).all())


@FAST
@given(shape=shapes, k=ks, seed=st.integers(0, 2**31 - 1), scale=scales)
def test_value_table_holds_the_mean_of_each_bin(
    shape: tuple[int, ...], k: int, seed: int, scale: float
) -> None:
    codec = SparseLoCoCodec(k=k)
    assume(not codec.is_dense(shape) and full_chunks(shape, k))
    x = random_tensor(shape, seed, scale).reshape(-1)
    payload, _ = codec.encode({"w": x.view(shape)}, [("w", shape)], HEADER)
    _, out = codec.decode(payload, [("w", shape)])
    idx, vals = out["w"].indices, out["w"].values
    assert idx is not None
    orig = x[idx].double()
    lut = tensors_of(payload)["lut"][0]
    assert torch.equal(lut, lut.sort().values)
    for v in vals.unique():
        members = orig[vals == v]
        # Each entry is the mean of the original values in its bin, and lies within the bin.
        assert math.isclose(float(members.mean()), float(v), rel_tol=1e-5, abs_tol=1e-6 * scale)
        tol = 1e-6 * abs(float(v)) + 1e-6 * scale
        assert float(members.min()) - tol <= float(v) <= float(members.max()) + tol
    # Quantisation is monotone: a larger original never decodes to a smaller value.
    order = orig.argsort()
    assert bool((vals[order].diff() >= 0).all())


def test_decoded_signs_match_on_a_gaussian_matrix() -> None:
    x = random_tensor((256, 256), 7)
    codec = SparseLoCoCodec()
    _, out = codec.decode(codec.encode({"w": x}, [("w", (256, 256))], HEADER)[0], [("w", (256, 256))])
    idx, vals = out["w"].indices, out["w"].values
    assert idx is not None
    assert torch.equal(torch.sign(vals), torch.sign(x.reshape(-1)[idx]))
    err = (vals - x.reshape(-1)[idx]).abs().max()
    assert float(err) < 0.5 * float(x.abs().max())


@FAST
@given(shape=shapes, k=ks, seed=st.integers(0, 2**31 - 1), fewer=st.booleans())
def test_sparse_input_keeps_its_positions(shape: tuple[int, ...], k: int, seed: int, fewer: bool) -> None:
    codec = SparseLoCoCodec(k=k)
    assume(not codec.is_dense(shape))
    rng = np.random.default_rng(seed)
    chunks = chunk_of(shape)
    x = np.zeros(chunks.size, dtype=np.float32)
    for cid in range(chunks.max() + 1):
        members = np.flatnonzero(chunks == cid)
        take = min(k, members.size) - (1 if fewer and members.size > 1 else 0)
        pos = rng.choice(members, size=take, replace=False)
        x[pos] = rng.choice([-1.0, 1.0], size=take) * (1.0 + rng.random(take))
    t = torch.from_numpy(x).view(shape)
    _, out = codec.decode(codec.encode({"w": t}, [("w", shape)], HEADER)[0], [("w", shape)])
    idx = out["w"].indices
    assert idx is not None
    nonzero = set(np.flatnonzero(x).tolist())
    if fewer:
        assert nonzero <= set(idx.tolist())
    else:
        assert set(idx.tolist()) == nonzero


def test_two_valued_input_comes_back_exactly() -> None:
    # Eight values of 0.5 per tile and k=16: the kept values are 0.5 and 0.0, one bin each.
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 128)
    for cols in (slice(0, 64), slice(64, 128)):
        tile = torch.zeros(4096).index_fill(0, torch.randperm(4096, generator=g)[:8], 0.5)
        x[:, cols] = tile.view(64, 64)
    assert int((x[:, :64] != 0).sum()) == int((x[:, 64:] != 0).sum()) == 8
    codec = SparseLoCoCodec(k=16)
    _, out = codec.decode(codec.encode({"w": x}, [("w", (64, 128))], HEADER)[0], [("w", (64, 128))])
    assert out["w"].indices is not None and out["w"].indices.numel() == 32
    assert torch.equal(out["w"].to_dense((64, 128)), x)


def test_payload_is_about_ten_bits_per_kept_value() -> None:
    codec = SparseLoCoCodec(k=64)
    for shape in [(1024, 1024), (2048, 2048)]:
        x = random_tensor(shape, 3)
        payload, _ = codec.encode({"w": x}, [("w", shape)], HEADER)
        kept = math.prod(shape) // 64
        # Index and value streams are exactly 10 bits a value; the framing is a small fixed cost.
        body = sum(t.numel() for name, t in tensors_of(payload).items() if name in ("idx", "val"))
        assert body * 8 == 10 * kept
        assert len(payload) - body < 600
    assert len(payload) * 8 / kept <= 10.1  # the whole 2048 x 2048 payload


def test_header_fields_travel_and_codec_fields_are_the_encoders() -> None:
    stats = PayloadStats(compute_s=1.5, loss_before=5.0, loss_after=4.0)
    header = PayloadHeader(
        format_version=PAYLOAD_FORMAT_VERSION, codec="dense_fp32", round=9, base_version=8, stats=stats
    )
    codec = SparseLoCoCodec(k=16)
    got, _ = codec.decode(codec.encode({"w": torch.ones(100)}, [("w", (100,))], header)[0], [("w", (100,))])
    assert (got.codec, got.k, got.tile, got.round, got.base_version) == ("sparseloco", 16, 64, 9, 8)
    assert got.stats == stats


def test_multi_tensor_spec_keeps_each_tensor_apart() -> None:
    spec: Spec = [("a", (130, 70)), ("b", (10,)), ("c", (5000,)), ("d", (64, 64))]
    xs = {n: random_tensor(s, i, scale=10.0**i) for i, (n, s) in enumerate(spec)}
    codec = SparseLoCoCodec()
    payload, decoded = codec.encode(xs, spec, HEADER)
    _, out = codec.decode(payload, spec)
    luts = tensors_of(payload)["lut"]
    assert luts.shape == (3, 4)
    for name, shape in spec:
        assert_same(decoded[name], out[name], shape)
        if not codec.is_dense(shape):
            # Each sparse tensor has its own table, in spec order.
            assert bool(torch.isin(out[name].values, luts[sparse_index(spec, codec, name)]).all())


# -- dense codecs and bf16 input --------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_dense_codec_round_trip(dtype: str, torch_dtype: torch.dtype) -> None:
    spec: Spec = [("a", (33, 7)), ("b", (5,))]
    xs = {n: random_tensor(s, i) for i, (n, s) in enumerate(spec)}
    codec = DenseCodec(dtype)  # type: ignore[arg-type]
    payload, decoded = codec.encode(xs, spec, HEADER)
    header, out = codec.decode(payload, spec)
    assert header.codec == codec.name and header.round == 3
    assert len(payload) - 236 * torch_dtype.itemsize < 400
    for name, shape in spec:
        expected = xs[name].to(torch_dtype).float()
        assert out[name].indices is None
        assert torch.equal(out[name].to_dense(shape), expected)
        assert_same(decoded[name], out[name], shape)


@pytest.mark.parametrize(
    "codec", [SparseLoCoCodec(), SparseLoCoCodec(k=16), DenseCodec("fp32"), DenseCodec("bf16")]
)
def test_codecs_accept_bf16_parameters(codec: SparseLoCoCodec | DenseCodec) -> None:
    spec: Spec = [("a", (130, 70)), ("b", (30,)), ("c", (4096,))]
    xs = {n: random_tensor(s, i).bfloat16() for i, (n, s) in enumerate(spec)}
    payload, decoded = codec.encode(xs, spec, HEADER)
    _, out = codec.decode(payload, spec)
    _, reference = codec.encode({n: t.float() for n, t in xs.items()}, spec, HEADER)
    for name, shape in spec:
        assert_same(decoded[name], out[name], shape)
        assert_same(reference[name], out[name], shape)


# -- quantiser --------------------------------------------------------------------------------------------
def test_quantize_2bit_uses_six_sigma_bins() -> None:
    vals = torch.tensor([-3.0, -1.0, 1.0, 3.0] * 4)  # mean 0, sigma sqrt(5): edges at -3.35, 0, 3.35
    lut, codes = quantize_2bit(vals)
    assert codes.tolist() == [1, 1, 2, 2] * 4
    assert lut[1].item() == -2.0 and lut[2].item() == 2.0
    sigma = math.sqrt(5.0)
    # Empty bins carry their centre so the table stays sorted and finite.
    assert lut[0].item() == pytest.approx(-2.25 * sigma)
    assert lut[3].item() == pytest.approx(2.25 * sigma)


def test_quantize_2bit_constant_values_are_exact() -> None:
    lut, codes = quantize_2bit(torch.full((64,), 0.25))
    assert bool((lut[codes] == 0.25).all())


# -- edge cases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "k"), [((64, 65), 16), ((100, 130), 64)])
def test_edge_tiles_of_a_padded_matrix_send_their_real_elements(shape: tuple[int, int], k: int) -> None:
    x = random_tensor(shape, 0, scale=1e-3)
    codec = SparseLoCoCodec(k=k)
    _, out = codec.decode(codec.encode({"w": x}, [("w", shape)], HEADER)[0], [("w", shape)])
    idx = out["w"].indices
    assert idx is not None
    chunks = chunk_of(shape)
    expected = sum(min(k, int(n)) for n in np.bincount(chunks))
    assert idx.numel() == expected
    assert is_valid_topk(x.numpy(), idx.numpy(), shape, k)


@pytest.mark.parametrize("shape", [(4097,), (65, 65)])
def test_padding_does_not_distort_the_value_table(shape: tuple[int, ...]) -> None:
    x = random_tensor(shape, 11).reshape(-1)
    codec = SparseLoCoCodec()
    _, out = codec.decode(codec.encode({"w": x.view(shape)}, [("w", shape)], HEADER)[0], [("w", shape)])
    idx, vals = out["w"].indices, out["w"].values
    assert idx is not None
    orig = x[idx]
    for v in vals.unique():
        assert float(orig[vals == v].mean()) == pytest.approx(float(v), rel=1e-4)


@pytest.mark.parametrize(("shape", "scale"), [((8,), 1e5), ((4096,), 1e37)])
def test_finite_input_always_encodes_to_a_decodable_payload(shape: tuple[int, ...], scale: float) -> None:
    x = random_tensor(shape, 2, scale)
    codec = SparseLoCoCodec()
    payload, decoded = codec.encode({"w": x}, [("w", shape)], HEADER)
    assert bool(torch.isfinite(decoded["w"].values).all())
    codec.decode(payload, [("w", shape)])


def test_dense_decoded_does_not_alias_the_input() -> None:
    x = torch.randn(10)
    _, decoded = DenseCodec("fp32").encode({"w": x}, [("w", (10,))], HEADER)
    before = decoded["w"].values.clone()
    x.zero_()
    assert torch.equal(decoded["w"].values, before)


def test_the_registry_builds_exactly_the_codecs_a_payload_may_name() -> None:
    from protocol import codec

    assert tuple(codec.CODECS) == CODEC_NAMES
    for name in CODEC_NAMES:
        assert make_codec(name).name == name
