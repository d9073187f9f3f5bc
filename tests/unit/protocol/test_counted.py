"""The published update with a count per chunk: it keeps every value at or above one threshold for the whole
model, the lowest whose bytes fit the same-k format's, decodes to exactly those values (quantised), and a
hostile update is refused with a documented code."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.codec import SparseLoCoCodec
from protocol.codec.chunks import Layout
from protocol.codec.counted import CountedCodec, count_sizes
from protocol.codec.elias_fano import ef_bytes
from protocol.errors import CodecError
from protocol.payload import framed_bytes
from tests.helpers.codec_layout import Spec

SPEC: Spec = [("a", (130, 70)), ("b", (4097,)), ("c", (10,)), ("d", (64, 64)), ("e", (3, 5, 7))]
WIDER: Spec = [*SPEC, ("f", (512, 256))]  # 42 chunk rows: enough to guess from a sample of them


def update(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Heavy-tailed values: a few chunks hold most of the energy, as an aggregate's do."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 6 for n, s in spec}


def flat(tensors: dict[str, torch.Tensor], spec: Spec) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n, _ in spec])


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sparse_magnitudes(codec: CountedCodec, u: dict[str, torch.Tensor], spec: Spec) -> torch.Tensor:
    """Every magnitude of the tensors the format sends sparse, in the concatenated parameters' order."""
    out = torch.zeros(sum(math.prod(s) for _, s in spec))
    at = 0
    for name, shape in spec:
        n = math.prod(shape)
        if not codec.geometry.is_dense(shape):
            out[at : at + n] = u[name].abs().reshape(-1)
        at += n
    return out


def chunk_bytes(codec: CountedCodec, u: dict[str, torch.Tensor], spec: Spec, threshold: float) -> int:
    """The bytes of the update keeping every sparse value at or above ``threshold``."""
    total = 0
    for name, shape in spec:
        if codec.geometry.is_dense(shape):
            total += 2 * math.prod(shape)
            continue
        counts = (Layout(shape, codec.tile).abs_chunks(u[name]) >= threshold).sum(dim=1)
        total += int((codec.sizes[0] + codec.sizes[1])[counts].sum()) + 4 * codec.levels
        total += codec.count_bytes * len(counts)
    return total


@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("sample_rows", [1, 256])  # the threshold first guessed from a sample, or not
def test_it_keeps_what_lies_above_the_lowest_threshold_that_fits_the_same_k_bytes(
    k: int, sample_rows: int
) -> None:
    geometry = SparseLoCoCodec(k=k)
    codec = CountedCodec(geometry, sample_rows=sample_rows)
    u = update(WIDER)
    tensors = codec.encode(u, WIDER)
    assert nbytes(tensors) <= codec.budget(WIDER) == geometry.max_payload_bytes(WIDER) - framed_bytes(0)

    decoded = codec.decode_flat(tensors, WIDER)
    mags = sparse_magnitudes(codec, u, WIDER)
    kept = (decoded != 0) & (mags > 0)
    threshold = float(mags[kept].min())
    assert bool((kept == (mags >= threshold)).all())  # every value at or above it, none below
    assert chunk_bytes(codec, u, WIDER, threshold) == nbytes(tensors)
    next_one = float(mags[mags < threshold].max())  # keeping one more value would not fit
    assert chunk_bytes(codec, u, WIDER, next_one) > codec.budget(WIDER)
    counts = tensors["count"].long()
    assert int(counts.min()) == 0 and int(counts.max()) > k  # chunks keep as many values as they deserve

    values = decoded[kept]  # 2-bit values: at most 4 levels a tensor, each its bin's mean
    assert values.unique().numel() <= 4 * len(tensors["lut"])
    assert [n for n, s in WIDER if geometry.is_dense(s)] == ["c"]  # in fp16
    assert torch.equal(decoded[130 * 70 + 4097 :][:10], u["c"].half().float())


@pytest.mark.parametrize(("tile", "bits"), [(8, 2), (10, 2), (64, 2), (64, 4), (32, 8)])
def test_a_chunks_bytes_by_its_count_are_the_elias_fano_and_value_bytes(tile: int, bits: int) -> None:
    idx, val = count_sizes(tile * tile, bits)
    assert idx[0] == val[0] == 0
    for k in range(1, tile * tile + 1):
        assert (int(idx[k]), int(val[k])) == (sum(ef_bytes(tile * tile, k)), -(-k * bits // 8))


def test_at_a_tile_where_more_values_can_take_fewer_bytes_it_stays_within_budget() -> None:
    """Tile 10, 2 bits: a chunk of 52 values takes fewer bytes than one of 49 (one low bit fewer each)."""
    codec = CountedCodec(SparseLoCoCodec(k=56, tile=10, bits=2))
    per = (codec.sizes[0] + codec.sizes[1]).tolist()
    assert per[52] < per[49]
    spec: Spec = [("w", (100,)), ("v", (30, 30))]
    for seed in range(20):
        u = update(spec, seed)
        tensors = codec.encode(u, spec)
        assert nbytes(tensors) <= codec.budget(spec)
        assert torch.equal(
            codec.decode_flat(tensors, spec) != 0,
            flat(u, spec).abs() >= threshold_of(codec, tensors, u, spec),
        )


def threshold_of(
    codec: CountedCodec, tensors: dict[str, torch.Tensor], u: dict[str, torch.Tensor], spec: Spec
) -> float:
    mags = flat(u, spec).abs()
    return float(mags[codec.decode_flat(tensors, spec) != 0].min())


def test_the_same_update_twice_is_the_same_bytes_and_wider_chunks_count_in_int32() -> None:
    u = update(SPEC, seed=3)
    codec = CountedCodec(SparseLoCoCodec(k=64))
    first, again = codec.encode(u, SPEC), codec.encode(u, SPEC)
    assert all(torch.equal(first[n], again[n]) for n in first)
    wide = CountedCodec(SparseLoCoCodec(k=64, tile=256))
    assert wide.encode(u, SPEC)["count"].dtype == torch.int32
    assert torch.count_nonzero(wide.decode_flat(wide.encode(u, SPEC), SPEC)) > 0


def test_an_update_with_nothing_to_send_is_all_zeros() -> None:
    codec = CountedCodec(SparseLoCoCodec())
    zeros = {n: torch.zeros(s) for n, s in SPEC}
    tensors = codec.encode(zeros, SPEC)
    assert int(tensors["count"].abs().sum()) == 0 and tensors["idx"].numel() == 0
    assert not bool(codec.decode_flat(tensors, SPEC).any())


def broken(tensors: dict[str, torch.Tensor], name: str, change: object) -> dict[str, torch.Tensor]:
    out = {n: t.clone() for n, t in tensors.items()}
    if callable(change):
        out[name] = change(out[name])
    return out


@pytest.mark.parametrize(
    ("name", "change", "code"),
    [
        ("count", lambda t: t.to(torch.int32), "wrong_dtype"),
        ("count", lambda t: t[:-1], "wrong_shape"),
        ("count", lambda t: torch.where(t == t.max(), torch.full_like(t, 4097), t), "wrong_k"),
        ("count", lambda t: torch.where(t == t.max(), -t, t), "wrong_k"),
        ("count", lambda t: torch.where(t == t.max(), t + 1, t), "wrong_shape"),  # the streams' lengths
        ("idx", lambda t: t[:-1], "wrong_shape"),
        ("idx", lambda t: torch.full_like(t, 0xFF), "wrong_k"),  # a bitmap with too many ones
        ("val", lambda t: torch.cat([t, t[:1]]), "wrong_shape"),
        ("lut", lambda t: torch.full_like(t, float("nan")), "non_finite"),
        ("dense", lambda t: torch.full_like(t, float("inf")), "non_finite"),
    ],
)
def test_a_hostile_update_is_refused_with_its_code(name: str, change: object, code: str) -> None:
    codec = CountedCodec(SparseLoCoCodec())
    tensors = broken(codec.encode(update(SPEC), SPEC), name, change)
    with pytest.raises(CodecError) as e:
        codec.decode_flat(tensors, SPEC)
    assert e.value.code == code


def test_a_kept_value_in_a_chunks_padding_is_refused() -> None:
    """Chunk rows of ``b`` (4097 values): the second holds one real value; an index past it is padding."""
    spec: Spec = [("b", (4097,))]
    codec = CountedCodec(SparseLoCoCodec(k=4))
    u = {"b": torch.zeros(4097)}
    u["b"][4096] = 1.0  # the one real value of the last chunk: kept at index 0
    tensors = codec.encode(u, spec)
    assert tensors["count"].tolist() == [0, 1]
    assert torch.equal(codec.decode_flat(tensors, spec), u["b"])
    tensors["idx"][0] = 1  # its low bits: index 1, which is padding
    with pytest.raises(CodecError, match="padding") as e:
        codec.decode_flat(tensors, spec)
    assert e.value.code == "index_out_of_range"
    missing = {n: t for n, t in tensors.items() if n != "val"}
    with pytest.raises(CodecError) as e:
        codec.decode_flat(missing, spec)
    assert e.value.code == "wrong_tensors"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_publishes_the_same_tensors_as_on_the_cpu() -> None:
    """A coordinator on a GPU publishes what one on the CPU does: the same threshold, counts and bytes."""
    codec = CountedCodec(SparseLoCoCodec(), sample_rows=1)
    u = update(WIDER, seed=5)
    on_cpu = codec.encode(u, WIDER)
    on_cuda = codec.encode({n: t.cuda() for n, t in u.items()}, WIDER)
    assert all(torch.equal(on_cpu[n], on_cuda[n]) for n in on_cpu if n != "lut")
    torch.testing.assert_close(on_cpu["lut"], on_cuda["lut"])  # bin means: sums in another order
