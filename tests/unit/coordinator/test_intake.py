"""Every refusal at upload: the right status, one error body shape, and the model left as it was."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as st_load

from coordinator.hooks import Hooks
from coordinator.settings import CoordinatorSettings, DataSettings, RoundSettings
from protocol.codec import SparseLoCoCodec
from protocol.signing import HEADER_NONCE, HEADER_SIGNATURE, generate_key
from tests.helpers.pool import (
    Miner,
    OpenPool,
    Pool,
    assert_error,
    encode,
    make_delta,
    payload,
    reframe,
    running,
    submit_path,
)


def unchanged(info: dict[str, Any]) -> tuple[Any, ...]:
    """What no refused upload may change: the round, its model and its uploads."""
    return info["round"], info["version"], info["status"], info["param_hash"], info["submissions"]


@dataclass
class Intake:
    pool: Pool
    good: bytes  # a valid payload for round 0, version 0
    before: dict[str, Any]  # /v1/round before anything was refused

    def assert_refused(self, response: httpx.Response, status: int, code: str) -> None:
        """Refused with this status and code; the round, the model and the submissions are untouched."""
        assert_error(response, status, code)
        assert unchanged(self.pool.round()) == unchanged(self.before)
        assert self.pool.submissions() == {}


@pytest.fixture(scope="module")
def intake(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Iterator[Intake]:
    """One coordinator for every refusal below; no upload can close its round (the quorum is never met)."""
    settings = CoordinatorSettings(
        state_dir=tmp_path_factory.mktemp("intake") / "coordinator",
        model="tiny",
        data=DataSettings(corpus=corpus_file, eval_every=20, eval_sequences=16),
        rounds=RoundSettings(min_quorum=1000),
    )
    with running(settings) as pool:
        yield Intake(pool, payload(round_=0, base_version=0), pool.round())


# -- identity -----------------------------------------------------------------------------------------------
def test_unsigned_upload_is_refused(intake: Intake) -> None:
    r = intake.pool.client.post(submit_path(0), content=intake.good)
    intake.assert_refused(r, 401, "missing_signature")


def test_upload_without_a_nonce_is_refused(intake: Intake) -> None:
    miner = intake.pool.miner()
    headers = miner.signed(submit_path(0), intake.good)
    del headers[HEADER_NONCE]
    r = intake.pool.client.post(submit_path(0), content=intake.good, headers=headers)
    intake.assert_refused(r, 401, "missing_signature")


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda m, body: m.signed(submit_path(0), body + b"x"), id="signed-other-body"),
        pytest.param(lambda m, body: m.signed(submit_path(1), body), id="signed-other-path"),
        pytest.param(
            lambda m, body: {**m.signed(submit_path(0), body), HEADER_SIGNATURE: "00" * 64},
            id="zero-signature",
        ),
        pytest.param(
            lambda m, body: {**m.signed(submit_path(0), body), HEADER_SIGNATURE: "not hex"}, id="not-hex"
        ),
        pytest.param(
            lambda m, body: {
                **m.signed(submit_path(0), body),
                HEADER_SIGNATURE: generate_key().sign(b"something else").hex(),
            },
            id="other-key",
        ),
        pytest.param(lambda m, body: {**m.signed(submit_path(0), body), HEADER_NONCE: "n"}, id="short-nonce"),
    ],
)
def test_forged_signature_is_refused(intake: Intake, forge: Callable[[Miner, bytes], dict[str, str]]) -> None:
    miner = intake.pool.miner()
    r = intake.pool.client.post(submit_path(0), content=intake.good, headers=forge(miner, intake.good))
    intake.assert_refused(r, 401, "bad_signature")


@pytest.mark.parametrize("offset_s", [-3600.0, 3600.0], ids=["past", "future"])
def test_timestamp_outside_the_window_is_refused(intake: Intake, offset_s: float) -> None:
    miner = intake.pool.miner()
    r = miner.upload(0, intake.good, now=time.time() + offset_s)
    intake.assert_refused(r, 401, "expired_timestamp")


def test_replayed_nonce_is_refused(intake: Intake) -> None:
    miner = intake.pool.miner(register=False)
    headers = miner.signed("/v1/miners")
    assert intake.pool.client.post("/v1/miners", headers=headers).status_code == 200
    replay = intake.pool.client.post("/v1/miners", headers=headers)
    intake.assert_refused(replay, 401, "replayed_nonce")


def test_unknown_miner_is_refused(intake: Intake) -> None:
    stranger = intake.pool.miner(register=False)
    intake.assert_refused(stranger.upload(0, intake.good), 403, "unknown_miner")


def test_oversized_registration_is_refused(intake: Intake) -> None:
    miner = intake.pool.miner(register=False)
    r = miner.post("/v1/miners", b"x" * 5000)
    intake.assert_refused(r, 413, "payload_too_large")
    assert miner.register().json()["registered"] is True  # nothing was recorded for it


# -- malformed payloads -------------------------------------------------------------------------------------
def _first_chunk(good: bytes, low: list[int] | None = None, upper: list[int] | None = None) -> bytes:
    """Rewrite the first chunk's indices: 48 bytes of 6-bit low parts, then its 128-bit upper bitmap."""
    codec = SparseLoCoCodec()
    assert (codec.low_bytes, codec.high_bytes) == (48, 16), "the edits below assume k=64 of 4096"
    idx = st_load(good)["idx"].clone()
    if low is not None:
        idx[0:48] = torch.tensor(low, dtype=torch.uint8)
    if upper is not None:
        idx[48:64] = torch.tensor(upper, dtype=torch.uint8)
    return reframe(good, tensors={"idx": idx})


def _lut(good: bytes, value: float) -> bytes:
    lut = st_load(good)["lut"].clone()
    lut[0, 1] = value
    return reframe(good, tensors={"lut": lut})


MALFORMED: list[Any] = [
    pytest.param(lambda g: b"\x07garbage" * 200, "malformed_payload", id="garbage"),
    pytest.param(lambda g: b"", "malformed_payload", id="empty"),
    pytest.param(lambda g: g[: len(g) // 2], "malformed_payload", id="truncated"),
    pytest.param(lambda g: g[:-1], "malformed_payload", id="one-byte-short"),
    pytest.param(lambda g: reframe(g, raw_header="not json"), "bad_header", id="header-not-json"),
    pytest.param(lambda g: reframe(g, header={"evil": 1}), "bad_header", id="header-extra-field"),
    pytest.param(lambda g: reframe(g, header={"round": -1}), "bad_header", id="header-negative-round"),
    pytest.param(lambda g: reframe(g, header={"format_version": 2}), "wrong_format_version", id="format-2"),
    pytest.param(lambda g: reframe(g, header={"codec": "dense_fp32"}), "wrong_codec", id="codec-name"),
    pytest.param(lambda g: reframe(g, header={"k": 32}), "wrong_codec", id="header-k"),
    pytest.param(lambda g: reframe(g, header={"tile": 32}), "wrong_codec", id="header-tile"),
    pytest.param(
        lambda g: encode(make_delta(0), 0, 0, codec=SparseLoCoCodec(k=32))[0], "wrong_codec", id="encoded-k32"
    ),
    pytest.param(lambda g: _first_chunk(g, upper=[0] * 16), "wrong_k", id="empty-bitmap"),
    pytest.param(
        lambda g: _first_chunk(g, upper=[0] * 8 + [255] * 8), "index_out_of_range", id="index-past-chunk"
    ),
    pytest.param(  # 64 entries, all with high part 0 and low part 0: index 0 sixty-four times
        lambda g: _first_chunk(g, low=[0] * 48, upper=[255] * 8 + [0] * 8),
        "unsorted_indices",
        id="repeated-index",
    ),
    pytest.param(
        lambda g: reframe(g, tensors={"idx": st_load(g)["idx"][:-1]}), "wrong_shape", id="idx-short"
    ),
    pytest.param(lambda g: reframe(g, tensors={"lut": st_load(g)["lut"][:, :3]}), "wrong_shape", id="lut-3"),
    pytest.param(
        lambda g: reframe(g, tensors={"dense": torch.zeros(3, dtype=torch.float16)}),
        "wrong_shape",
        id="dense-extra-values",
    ),
    pytest.param(
        lambda g: reframe(g, tensors={"lut": st_load(g)["lut"].double()}), "wrong_dtype", id="lut-float64"
    ),
    pytest.param(
        lambda g: reframe(g, tensors={"val": st_load(g)["val"].view(torch.int8)}),
        "wrong_dtype",
        id="val-int8",
    ),
    pytest.param(lambda g: reframe(g, tensors={"dense": None}), "wrong_tensors", id="missing-tensor"),
    pytest.param(
        lambda g: reframe(g, tensors={"extra": torch.zeros(4, dtype=torch.uint8)}),
        "wrong_tensors",
        id="extra-tensor",
    ),
    pytest.param(lambda g: _lut(g, float("nan")), "non_finite", id="nan-in-value-table"),
    pytest.param(lambda g: _lut(g, float("inf")), "non_finite", id="inf-in-value-table"),
    pytest.param(lambda g: payload(round_=1, base_version=0), "round_mismatch", id="round-mismatch"),
]


@pytest.mark.parametrize(("make", "code"), MALFORMED)
def test_malformed_payload_is_refused(intake: Intake, make: Callable[[bytes], bytes], code: str) -> None:
    miner = intake.pool.miner()
    intake.assert_refused(miner.upload(0, make(intake.good)), 422, code)


def test_payload_on_a_base_version_the_round_is_not_for_is_refused(intake: Intake) -> None:
    miner = intake.pool.miner()
    intake.assert_refused(miner.upload(0, payload(round_=0, base_version=1)), 409, "stale_version")


def test_upload_for_a_future_round_is_refused(intake: Intake) -> None:
    miner = intake.pool.miner()
    intake.assert_refused(miner.upload(3, payload(round_=3, base_version=0)), 409, "round_not_open")


# -- body size ----------------------------------------------------------------------------------------------
def test_oversized_upload_is_refused_declared_or_streamed(open_pool: OpenPool) -> None:
    with open_pool(max_payload_bytes=4096) as pool:
        before = pool.round()
        miner = pool.miner()
        body = payload(round_=0, base_version=0)
        assert len(body) > 4096
        assert_error(miner.upload(0, body), 413, "payload_too_large")

        # Without a Content-Length the body is cut off as it streams in.
        headers = miner.signed(submit_path(0), body)
        chunks = iter([body[i : i + 1024] for i in range(0, len(body), 1024)])
        r = pool.client.post(submit_path(0), content=chunks, headers=headers)
        assert_error(r, 413, "payload_too_large")
        assert unchanged(pool.round()) == unchanged(before)
        assert pool.submissions() == {}


# -- rules of the round -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_round_rules(open_pool: OpenPool, overlap: bool) -> None:
    """Replay, duplicate, second upload; after the round closed: closed round, stale base, future round."""
    with open_pool(rounds={"overlap": overlap}) as pool:
        alice, bob = pool.miner(), pool.miner()
        start = pool.round()
        body = payload(round_=0, base_version=0, seed=1)
        headers = alice.signed(submit_path(0), body)
        first = pool.client.post(submit_path(0), content=body, headers=headers)
        assert first.status_code == 200, first.text

        assert_error(pool.client.post(submit_path(0), content=body, headers=headers), 401, "replayed_nonce")
        again = alice.upload(0, body)
        assert again.status_code == 200, again.text
        assert again.json() == {**first.json(), "duplicate": True}
        assert_error(alice.upload(0, payload(round_=0, base_version=0, seed=2)), 409, "already_submitted")
        # bob is still expected, so the round stays open with alice's one upload.
        assert unchanged(pool.round()) == (0, 0, "open", start["param_hash"], 1)

        assert bob.upload(0, payload(round_=0, base_version=0, seed=3)).status_code == 200
        now = pool.wait_for_round(0)
        assert (now["round"], pool.latest()["version"]) == (1, 1)

        assert_error(bob.upload(0, payload(round_=0, base_version=0, seed=3)), 409, "round_closed")
        # synchronous: round 1 is for version 1 alone, so version 0 is stale; overlapped: it is for version
        # 0 and the newest one, 1, and version 2 does not exist yet
        stale = 2 if overlap else 0
        assert_error(alice.upload(1, payload(round_=1, base_version=stale, seed=4)), 409, "stale_version")
        assert_error(alice.upload(2, payload(round_=2, base_version=1, seed=4)), 409, "round_not_open")
        assert unchanged(pool.round()) == unchanged(now)
        assert pool.submissions() == {
            (0, alice.pubkey): ("accepted", None),
            (0, bob.pubkey): ("accepted", None),
        }


def _race(pool: Pool, miner: Miner, bodies: list[bytes]) -> list[int]:
    """Send two signed uploads from one miner at the same moment; their status codes, sorted."""
    requests = [(b, miner.signed(submit_path(0), b)) for b in bodies]
    statuses: list[int] = []
    barrier = threading.Barrier(len(requests))

    def send(body: bytes, headers: dict[str, str]) -> None:
        barrier.wait()
        statuses.append(pool.client.post(submit_path(0), content=body, headers=headers).status_code)

    threads = [threading.Thread(target=send, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return sorted(statuses)


def test_concurrent_uploads_from_one_miner_are_refused_cleanly(open_pool: OpenPool) -> None:
    """Both uploads are checked before either is committed (the hook holds each until the other is there
    too), so each race really happens; one upload is taken, the other refused or a duplicate."""
    arrived = threading.Barrier(2, timeout=30)
    raced: list[str] = []

    def hold(round_: int, miner: str) -> None:
        raced.append(miner)
        arrived.wait()

    hooks = Hooks(before_intake_commit=hold)
    with open_pool(raise_server_exceptions=False, rounds={"min_quorum": 1000}, app={"hooks": hooks}) as pool:
        miners = [pool.miner() for _ in range(4)]
        different = [
            _race(pool, m, [payload(0, 0, seed=10 + i), payload(0, 0, seed=20 + i)])
            for i, m in enumerate(miners[:2])
        ]
        assert different == [[200, 409]] * 2
        same = [_race(pool, m, [payload(0, 0, seed=30 + i)] * 2) for i, m in enumerate(miners[2:])]
        assert same == [[200, 200]] * 2  # the second one is a duplicate
        assert raced == [m.pubkey for m in miners for _ in range(2)]
        assert {m for _, m in pool.submissions()} == {m.pubkey for m in miners}
