"""The coordinator API on its success path: info, registration, a full round, catching up, data."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from protocol.codec import SparseLoCoCodec
from protocol.params import UpdateHeader, apply_update, decode_update, load_checkpoint, params_hash
from protocol.wire import HEADER_PROTOCOL, PROTOCOL_VERSION, RoundReport, Status
from tests.helpers.clock import ManualClock
from tests.helpers.pool import SPEC, OpenPool, assert_error, encode, make_delta, payload, reframe

REPORT_FIELDS = set(RoundReport.model_fields)


def test_healthz_and_info(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        r = pool.client.get("/healthz")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}
        assert r.headers[HEADER_PROTOCOL] == str(PROTOCOL_VERSION)

        info = pool.client.get("/v1/info").json()
        assert info["protocol_version"] == PROTOCOL_VERSION
        assert info["model"] == "tiny"
        assert info["seq_len"] == 128
        assert info["eval_every"] == 50
        assert info["num_sequences"] > 2 * 50
        assert info["codec"] == {"name": "sparseloco", "k": 64, "tile": 64}
        assert info["recipe"]["inner_steps"] == 4
        # The upload cap is the largest valid payload for this model and codec (issue: bounded resources).
        assert info["max_payload_bytes"] == SparseLoCoCodec().max_payload_bytes(SPEC)

        # Unknown routes answer in the same error shape, with the protocol header.
        missing = pool.client.get("/v1/nothing-here")
        assert_error(missing, 404, "not_found")
        assert missing.headers[HEADER_PROTOCOL] == str(PROTOCOL_VERSION)


def test_register_new_then_known(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        miner = pool.miner(register=False)
        first = miner.register()
        assert first.status_code == 200, first.text
        assert first.json() == {"miner": miner.pubkey, "registered": True}
        again = miner.register()
        assert again.status_code == 200, again.text
        assert again.json() == {"miner": miner.pubkey, "registered": False}

        pool.miner()
        status = pool.client.get("/v1/status").json()
        assert status["miners"] == 2
        assert pool.round()["expected"] == 2


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_round_closes_and_the_published_update_catches_up_bit_exactly(
    open_pool: OpenPool, overlap: bool
) -> None:
    with open_pool(rounds={"overlap": overlap}) as pool:
        start = pool.round()
        assert (start["round"], start["version"], start["status"], start["submissions"]) == (0, 0, "open", 0)
        v0 = pool.client.get("/v1/versions/0").json()
        assert v0["param_hash"] == start["param_hash"]
        assert v0["round"] is None

        miner = pool.miner()
        body, decoded = encode(make_delta(seed=1), round_=0, base_version=0)
        r = miner.upload(0, body)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "round": 0,
            "miner": miner.pubkey,
            "payload_sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body),
            "duplicate": False,
        }

        now, latest = pool.wait_for_round(0), pool.latest()
        assert (now["round"], now["status"], now["submissions"], latest["version"]) == (1, "open", 0, 1)
        # synchronous: round 1 is for version 1; overlapped: it opened for version 0 as round 0 began
        # closing, and takes uploads trained from either
        assert now["version"] == (0 if overlap else 1)
        assert latest["param_hash"] != start["param_hash"]
        v1 = pool.client.get("/v1/versions/1").json()
        assert v1["param_hash"] == latest["param_hash"]
        assert v1["round"] == 0
        assert v1["eval_loss"] is not None and math.isfinite(v1["eval_loss"])

        r = pool.client.get("/v1/versions/1/update")
        assert r.status_code == 200
        assert r.headers["ETag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        assert len(r.content) == v1["update_bytes"] > 0
        header, delta = decode_update(r.content, SPEC)
        assert header == UpdateHeader(base_version=0, version=1, param_hash=v1["param_hash"])
        # One accepted payload, outer lr 1: the published update is exactly what the payload decodes to.
        for name, _ in SPEC:
            assert torch.equal(delta[name], decoded[name]), name

        params = pool.checkpoint(0)
        assert params_hash(params, SPEC) == v0["param_hash"]
        apply_update(params, delta)
        assert params_hash(params, SPEC) == v1["param_hash"]

        latest = pool.client.get("/v1/checkpoint")
        assert latest.headers["X-Gradpool-Version"] == "1"
        assert len(latest.content) == v1["checkpoint_bytes"]
        published, meta = load_checkpoint(latest.content, SPEC)
        assert meta == {"version": "1", "param_hash": v1["param_hash"]}
        for name, _ in SPEC:
            assert torch.equal(published[name], params[name]), name


def test_round_waits_for_its_quorum_then_closes_at_the_deadline(open_pool: OpenPool) -> None:
    clock = ManualClock(start=time.time())
    with open_pool(rounds={"min_quorum": 2, "deadline_s": 0.3}, app={"clock": clock}) as pool:
        alice, bob, _silent = pool.miner(), pool.miner(), pool.miner()
        assert pool.round()["deadline_s"] is None  # no upload yet, no deadline
        assert alice.upload(0, payload(round_=0, base_version=0, seed=1)).status_code == 200
        assert pool.round()["deadline_s"] == pytest.approx(0.3)

        # Past the deadline but below the quorum: the round stays open (a long-poll for it to move ends
        # at its wait).
        clock.advance(1.0)
        waited = pool.client.get("/v1/round", params={"after": 0, "wait_s": 0.5}).json()
        assert (waited["round"], waited["submissions"], waited["deadline_s"]) == (0, 1, 0.0)

        # The quorum is met and the deadline has passed: it closes without the silent miner.
        assert bob.upload(0, payload(round_=0, base_version=0, seed=2)).status_code == 200
        after = pool.wait_for_round(0)
        assert (after["round"], after["expected"], pool.latest()["version"]) == (1, 3, 1)
        assert pool.client.get("/v1/status").json()["rounds"][0]["accepted"] == 2


def test_unknown_versions_and_updates_are_not_found(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        assert_error(pool.client.get("/v1/versions/1"), 404, "not_found")
        assert_error(pool.client.get("/v1/versions/0/update"), 404, "not_found")  # version 0 has no update
        assert_error(pool.client.get("/v1/versions/1/update"), 404, "not_found")
        assert_error(pool.client.get("/v1/checkpoint", params={"version": 7}), 404, "not_found")


def test_checkpoint_has_an_etag_and_answers_range_requests(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        full = pool.client.get("/v1/checkpoint")
        assert full.status_code == 200
        assert full.headers["X-Gradpool-Version"] == "0"
        etag = f'"{hashlib.sha256(full.content).hexdigest()}"'
        assert full.headers["ETag"] == etag
        _, meta = load_checkpoint(full.content, SPEC)
        assert meta["param_hash"] == pool.round()["param_hash"]

        size = len(full.content)
        part = pool.client.get("/v1/checkpoint", headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206
        assert part.content == full.content[100:1100]
        assert part.headers["Content-Range"] == f"bytes 100-1099/{size}"
        assert part.headers["ETag"] == etag

        # Resuming a download: everything from an offset, and the last bytes.
        rest = pool.client.get("/v1/checkpoint", headers={"Range": f"bytes={size - 5000}-"})
        assert rest.status_code == 206
        assert rest.content == full.content[size - 5000 :]
        tail = pool.client.get("/v1/checkpoint", headers={"Range": "bytes=-16"})
        assert tail.status_code == 206
        assert tail.content == full.content[-16:]


def test_status_reports_every_closed_round(open_pool: OpenPool) -> None:
    clock = ManualClock(start=time.time())  # it stamps the rounds; signatures are checked by it too
    with open_pool(app={"clock": clock}) as pool:
        before = Status.model_validate_json(pool.client.get("/v1/status").content)
        assert before.rounds == []
        v0 = pool.client.get("/v1/versions/0").json()
        assert before.initial_eval_loss == v0["eval_loss"]
        assert before.initial_eval_loss is not None and math.isfinite(before.initial_eval_loss)

        # Downloads during round 0 count towards its bytes_down.
        down = len(pool.client.get("/v1/checkpoint").content)
        down += len(pool.client.get("/v1/data", params={"ids": "1,2,3"}).content)
        miner = pool.miner()
        body, _ = encode(make_delta(seed=2), round_=0, base_version=0, compute_s=2.5)
        health = {"grad_norm_mean": 0.8, "grad_norm_max": 1.7, "clipped_fraction": 0.25, "lr": 2e-3}
        body = reframe(body, header={"stats": {"compute_s": 2.5, **health}})
        clock.advance(7.0)
        assert miner.upload(0, body).status_code == 200
        pool.wait_for_round(0)

        raw = pool.client.get("/v1/status").json()
        assert len(raw["rounds"]) == 1
        assert set(raw["rounds"][0]) == REPORT_FIELDS
        status = Status.model_validate(raw)
        assert status.miners == 1
        assert status.round.round == 1
        assert status.initial_eval_loss == before.initial_eval_loss
        report = status.rounds[0]
        v1 = pool.client.get("/v1/versions/1").json()
        assert (report.round, report.version, report.accepted, report.rejected) == (0, 1, 1, 0)
        assert report.eval_loss == v1["eval_loss"]
        assert report.bytes_up == len(body)
        assert report.bytes_down == down
        assert report.compute_s == 2.5
        # training health as the miner reported it: in the report and in the metrics
        assert {f: getattr(report, f) for f in health} == health
        metrics = pool.client.get("/metrics").text
        assert 'gradpool_training_health{stat="grad_norm_max"} 1.7' in metrics
        assert report.wall_s == 7.0  # from its opening to the next round's, by the coordinator's clock


def test_data_serves_training_sequences(open_pool: OpenPool, corpus_file: Path) -> None:
    with open_pool() as pool:
        seq_len = pool.client.get("/v1/info").json()["seq_len"]
        ids = [1, 2, 19, 21, 57]
        r = pool.client.get("/v1/data", params={"ids": ",".join(map(str, ids))})
        assert r.status_code == 200, r.text
        tokens = st_load(r.content)["tokens"]
        assert set(st_load(r.content)) == {"tokens"}
        assert tokens.shape == (len(ids), seq_len + 1)
        assert tokens.dtype == torch.uint8  # byte vocabulary
        # Byte tokens: sequence i is bytes [i * (L + 1), (i + 1) * (L + 1)) of the corpus.
        text = corpus_file.read_text(encoding="utf-8").encode("utf-8")
        n = seq_len + 1
        for row, i in zip(tokens, ids, strict=True):
            assert bytes(row.tolist()) == text[i * n : (i + 1) * n], i


def test_data_refuses_held_out_and_bad_ids(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        info = pool.client.get("/v1/info").json()
        n, every = info["num_sequences"], info["eval_every"]
        for ids in ["0", str(every), f"1,2,{3 * every}"]:
            assert_error(pool.client.get("/v1/data", params={"ids": ids}), 403, "held_out")
        for ids in ["abc", "1,,2", "1.5", "", "-1", str(n), "1," * 4096 + "1"]:
            assert_error(pool.client.get("/v1/data", params={"ids": ids}), 400, "invalid_request")
        assert_error(pool.client.get("/v1/data"), 422, "invalid_request")
        assert_error(pool.client.get("/v1/data", params={"ids": "1" * 50_000}), 422, "invalid_request")
