"""Parameters on the wire: hash, checkpoints and the published update a miner uses to catch up."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol.errors import CodecError
from protocol.model import build_model
from protocol.params import (
    UpdateHeader,
    apply_update,
    decode_update,
    encode_update,
    file_sha256,
    get_params,
    load_checkpoint,
    param_spec,
    params_hash,
    read_checkpoint,
    save_checkpoint,
    set_params,
    write_checkpoint,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = [("a.weight", (37, 11)), ("b.bias", (5,)), ("c", (2, 3, 4)), ("d", (1,))]
HEADER = UpdateHeader(base_version=4, version=5, param_hash="ab" * 32)


def random_params(seed: int, density: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SPEC:
        t = torch.randn(shape, generator=g)
        out[name] = torch.where(torch.rand(shape, generator=g) < density, t, 0.0)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# -- spec, get/set, hash ----------------------------------------------------------------------------------
def test_param_spec_and_get_set_params() -> None:
    model = build_model("tiny", seed=0)
    spec = param_spec(model)
    assert spec[0] == ("wte.weight", (256, 128))
    assert [n for n, _ in spec] == [n for n, _ in model.named_parameters()]
    params = get_params(model)
    params["wte.weight"].add_(1.0)  # a copy, not the live parameter
    assert not torch.equal(params["wte.weight"], model.wte.weight)
    set_params(model, params)
    assert torch.equal(params["wte.weight"], model.wte.weight)


def test_params_hash_is_sensitive_to_values_names_and_shapes() -> None:
    p = random_params(0)
    h = params_hash(p, SPEC)
    assert len(h) == 64 and h == params_hash({n: t.clone() for n, t in p.items()}, SPEC)
    q = {n: t.clone() for n, t in p.items()}
    q["c"].view(-1)[7] = torch.nextafter(q["c"].view(-1)[7], torch.tensor(float("inf")))  # one ulp
    assert params_hash(q, SPEC) != h
    renamed = [("a.weight", (37, 11)), ("b.bias", (5,)), ("c", (2, 3, 4)), ("e", (1,))]
    assert params_hash({**p, "e": p["d"]}, renamed) != h
    reshaped = [("a.weight", (11, 37)), *SPEC[1:]]
    assert params_hash({**p, "a.weight": p["a.weight"].reshape(11, 37)}, reshaped) != h


def test_params_hash_of_bf16_input_is_the_hash_of_its_fp32_value() -> None:
    p = {n: t.bfloat16() for n, t in random_params(1).items()}
    assert params_hash(p, SPEC) == params_hash({n: t.float() for n, t in p.items()}, SPEC)


# -- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip() -> None:
    p = random_params(2)
    data = save_checkpoint(p, {"version": "3"})
    loaded, meta = load_checkpoint(data, SPEC)
    assert meta == {"version": "3"}
    assert params_hash(loaded, SPEC) == params_hash(p, SPEC)


def test_a_checkpoint_written_to_a_file_is_the_one_built_in_memory(tmp_path: Path) -> None:
    """``write_checkpoint`` (each version's checkpoint, streamed from the tensors) writes the very bytes
    ``save_checkpoint`` builds, and tensors of another dtype are written as fp32 as there."""
    p = random_params(3)
    p[SPEC[0][0]] = p[SPEC[0][0]].double()
    write_checkpoint(p, {"version": "4"}, tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_bytes() == save_checkpoint(p, {"version": "4"})
    loaded, meta = load_checkpoint((tmp_path / "ckpt").read_bytes(), SPEC)
    assert meta == {"version": "4"} and params_hash(loaded, SPEC) == params_hash(p, SPEC)


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        ({n: torch.zeros(s) for n, s in SPEC[:-1]}, "wrong_tensors"),
        ({**{n: torch.zeros(s) for n, s in SPEC}, "x": torch.zeros(1)}, "wrong_tensors"),
        ({**{n: torch.zeros(s) for n, s in SPEC}, "d": torch.zeros(1, dtype=torch.float64)}, "wrong_shape"),
        ({**{n: torch.zeros(s) for n, s in SPEC}, "c": torch.zeros(24)}, "wrong_shape"),
    ],
)
def test_bad_checkpoints_are_refused(tensors: dict[str, torch.Tensor], code: str, tmp_path: Path) -> None:
    """In memory and from a file (read_checkpoint checks the header before reading a tensor) alike."""
    data = st_save(tensors, metadata={})
    (tmp_path / "ckpt").write_bytes(data)
    for read in (lambda: load_checkpoint(data, SPEC), lambda: read_checkpoint(tmp_path / "ckpt", SPEC)):
        with pytest.raises(CodecError) as e:
            read()
        assert e.value.code == code


def test_garbage_checkpoint_is_a_codec_error(tmp_path: Path) -> None:
    with pytest.raises(CodecError):
        load_checkpoint(b"not a checkpoint at all", SPEC)
    good = save_checkpoint(random_params(5), {})
    for i, garbage in enumerate([b"not a checkpoint at all", good[: len(good) // 2], b"\xff" * 8 + good[8:]]):
        (tmp_path / f"bad-{i}").write_bytes(garbage)
        with pytest.raises(CodecError):
            read_checkpoint(tmp_path / f"bad-{i}", SPEC)


def test_a_checkpoint_read_from_a_file_is_the_one_loaded_from_bytes(tmp_path: Path) -> None:
    p = random_params(6)
    write_checkpoint(p, {"version": "9", "param_hash": "x"}, tmp_path / "ckpt")
    read, meta = read_checkpoint(tmp_path / "ckpt", SPEC)
    loaded, loaded_meta = load_checkpoint((tmp_path / "ckpt").read_bytes(), SPEC)
    assert meta == loaded_meta == {"version": "9", "param_hash": "x"}
    assert all(torch.equal(read[n], loaded[n]) and read[n].dtype == torch.float32 for n, _ in SPEC)
    whole = hashlib.sha256((tmp_path / "ckpt").read_bytes()).hexdigest()
    assert file_sha256(tmp_path / "ckpt", chunk_bytes=7) == file_sha256(tmp_path / "ckpt") == whole


# -- published updates ------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.0, 0.01, 0.3, 1.0]))
def test_update_round_trip_and_apply_is_bit_identical(seed: int, density: float) -> None:
    theta = random_params(seed)
    delta = random_params(seed + 1, density)
    data = encode_update(delta, SPEC, HEADER)
    header, decoded = decode_update(data, SPEC)
    assert header == HEADER
    for name, shape in SPEC:
        assert decoded[name].shape == shape
        assert torch.equal(bits(decoded[name]), bits(delta[name]))
    # The coordinator applies its delta; the miner applies the decoded update: same bits, same hash.
    coordinator = {n: t.clone() for n, t in theta.items()}
    miner = {n: t.clone() for n, t in theta.items()}
    apply_update(coordinator, delta)
    apply_update(miner, decoded)
    assert params_hash(coordinator, SPEC) == params_hash(miner, SPEC)
    for name, _ in SPEC:
        assert torch.equal(bits(coordinator[name]), bits(theta[name] - delta[name]))


def test_update_size_follows_the_touched_coordinates() -> None:
    delta = {n: torch.zeros(s) for n, s in SPEC}
    delta["a.weight"][3, 4] = 1.5
    t = st_load(encode_update(delta, SPEC, HEADER))
    assert t["values"].tolist() == [1.5]
    assert t["mask"].numel() == sum(-(-torch.Size(s).numel() // 8) for _, s in SPEC)


def _update_parts() -> tuple[dict[str, torch.Tensor], str]:
    data = encode_update(random_params(3, 0.5), SPEC, HEADER)
    n = int.from_bytes(data[:8], "little")
    return dict(st_load(data)), json.loads(data[8 : 8 + n])["__metadata__"]["gradpool_update"]


def _rebuilt(edit: object) -> bytes:
    t, meta = _update_parts()
    t, meta = edit(t, meta)  # type: ignore[operator]
    return st_save(t, metadata={"gradpool_update": meta})


def _mask_bit_beyond(t: dict[str, torch.Tensor], meta: str) -> tuple[dict[str, torch.Tensor], str]:
    # "d" has one element: its mask byte is the last one; setting bit 1 selects a coordinate past it.
    mask = t["mask"].clone()
    mask[-1] |= 2
    return {"mask": mask, "values": torch.cat([t["values"], torch.ones(1)])}, meta


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda t, m: ({"mask": t["mask"]}, m), "wrong_tensors"),
        (lambda t, m: ({**t, "x": torch.zeros(1)}, m), "wrong_tensors"),
        (lambda t, m: ({**t, "values": t["values"].double()}, m), "wrong_dtype"),
        (lambda t, m: ({**t, "mask": t["mask"].to(torch.int16)}, m), "wrong_dtype"),
        (lambda t, m: ({**t, "values": t["values"].view(1, -1)}, m), "wrong_dtype"),
        (lambda t, m: ({**t, "mask": t["mask"][:-1]}, m), "wrong_shape"),
        (lambda t, m: ({**t, "values": t["values"][:-1]}, m), "wrong_shape"),
        (lambda t, m: ({**t, "values": torch.cat([t["values"], torch.ones(1)])}, m), "wrong_shape"),
        (lambda t, m: ({**t, "values": torch.full_like(t["values"], float("nan"))}, m), "non_finite"),
        (_mask_bit_beyond, "index_out_of_range"),
        (lambda t, m: (t, m.replace('"version":5', '"version":0')), "malformed_payload"),
        (lambda t, m: (t, m[:-1] + ',"extra":1}'), "malformed_payload"),
        (lambda t, m: (t, "[]"), "malformed_payload"),
    ],
)
def test_corrupted_updates_raise_codec_errors(edit: object, code: str) -> None:
    with pytest.raises(CodecError) as e:
        decode_update(_rebuilt(edit), SPEC)
    assert e.value.code == code


@settings(max_examples=60, deadline=None)
@given(
    cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4)
)
def test_random_corruption_of_an_update_raises_only_codec_errors(
    cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(encode_update(random_params(4, 0.5), SPEC, HEADER))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    if cut:
        del data[len(data) - cut % len(data) :]
    try:
        _, out = decode_update(bytes(data), SPEC)
    except CodecError:
        return
    for name, shape in SPEC:
        assert out[name].shape == shape and bool(torch.isfinite(out[name]).all())


def test_signed_zero_in_the_delta_survives_publication() -> None:
    spec = [("w", (2,))]
    theta = {"w": torch.tensor([-0.0, 1.0])}
    delta = {"w": torch.tensor([-0.0, 0.5])}
    coordinator = {"w": theta["w"].clone()}
    apply_update(coordinator, delta)
    _, decoded = decode_update(encode_update(delta, spec, HEADER), spec)
    miner = {"w": theta["w"].clone()}
    apply_update(miner, decoded)
    assert params_hash(miner, spec) == params_hash(coordinator, spec)
