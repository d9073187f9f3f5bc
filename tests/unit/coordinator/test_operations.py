"""What an operator uses: readiness, metrics, the audit manifest, closing a round, the allowlist, the
adaptive deadline."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.clock import ManualClock
from tests.helpers.pool import Miner, OpenPool, assert_error, payload


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_readyz_and_metrics_follow_the_run(open_pool: OpenPool) -> None:
    with open_pool(rounds={"min_quorum": 2}) as pool:
        assert pool.client.get("/readyz").json() == {"status": "ready"}
        a, b = pool.miner(), pool.miner()
        assert a.upload(0, payload(0, 0, seed=1)).status_code == 200
        assert b.upload(0, payload(0, 0, seed=1)).status_code == 200  # a copy of a's update
        assert_error(a.post("/v1/miners", b"x" * 5000), 413, "payload_too_large")
        pool.wait_for_round(0)
        pool.client.get("/v1/checkpoint")
        m = samples(pool.client.get("/metrics").text)
    assert m[("gradpool_rounds_total", ())] == 1
    assert m[("gradpool_version", ())] == 1 and m[("gradpool_round", ())] == 1
    assert m[("gradpool_submissions_total", (("reason", ""), ("status", "accepted")))] == 1
    assert m[("gradpool_submissions_total", (("reason", "copied_payload"), ("status", "rejected")))] == 1
    assert m[("gradpool_refusals_total", (("code", "payload_too_large"),))] == 1
    assert m[("gradpool_uploaded_bytes_total", ())] > 0
    assert m[("gradpool_served_bytes_total", (("kind", "model"),))] > 0
    assert m[("gradpool_aggregation_seconds_count", ())] == 1
    assert 0 < m[("gradpool_eval_loss", ())] < 6


def test_the_audit_manifest_lists_every_upload_with_its_verdict(open_pool: OpenPool) -> None:
    with open_pool(rounds={"min_quorum": 2}) as pool:
        a, b = pool.miner(), pool.miner()
        body = payload(0, 0, seed=3)
        a.upload(0, body)
        b.upload(0, body)
        pool.wait_for_round(0)
        manifest = pool.client.get("/v1/rounds/0/audit").json()
        assert_error(pool.client.get("/v1/rounds/7/audit"), 404, "not_found")
    by_miner = {row["miner"]: row for row in manifest}
    assert by_miner[a.pubkey]["status"] == "accepted" and by_miner[a.pubkey]["reason"] is None
    assert by_miner[b.pubkey]["status"] == "rejected" and by_miner[b.pubkey]["reason"] == "copied_payload"
    assert by_miner[a.pubkey]["sha256"] == by_miner[b.pubkey]["sha256"]
    assert by_miner[a.pubkey]["bytes"] == len(body)


def test_an_operator_closes_a_round_early_with_the_admin_token(open_pool: OpenPool) -> None:
    with open_pool(admin_token="s3cret", rounds={"min_quorum": 5, "deadline_s": 600}) as pool:
        url = "/v1/admin/close-round"
        assert_error(pool.client.post(url), 401, "bad_admin_token")
        assert_error(pool.client.post(url, headers={"Authorization": "Bearer nope"}), 401, "bad_admin_token")
        admin = {"Authorization": "Bearer s3cret"}
        assert_error(pool.client.post(url, headers=admin), 409, "nothing_to_aggregate")
        pool.miner().upload(0, payload(0, 0))
        assert pool.client.post(url, headers=admin).json() == {"round": 0}
        assert pool.latest_after(0)["version"] == 1


def test_admin_endpoints_are_off_without_a_token(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        response = pool.client.post("/v1/admin/close-round", headers={"Authorization": "Bearer x"})
        assert_error(response, 403, "admin_disabled")


def test_an_allowlist_refuses_other_miners(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        allowed = Miner(pool.client)
    with open_pool(allowlist=[allowed.pubkey.upper()]) as pool:
        allowed.client = pool.client
        assert allowed.register().status_code == 200
        assert_error(Miner(pool.client).register(), 403, "not_allowed")


def test_the_deadline_adapts_to_how_quickly_uploads_arrived_in_recent_rounds(open_pool: OpenPool) -> None:
    # a clock that stands still until the test moves it: arrivals and deadlines by it, not the machine's (it
    # starts at the real time, so that signatures are within their window)
    clock = ManualClock(start=time.time())
    rounds = {"min_quorum": 1, "deadline_s": 600.0, "min_deadline_s": 1.0}
    with open_pool(app={"clock": clock}, rounds=rounds) as pool:
        a, b = pool.miner(), pool.miner()
        a.upload(0, payload(0, 0, seed=1))
        clock.advance(0.25)  # b arrives a quarter of a second later
        b.upload(0, payload(0, 0, seed=2))  # both in: the round closes at once
        assert pool.wait_for_round(0)["round"] == 1
        a.upload(1, payload(1, 1, seed=3))  # b stays silent
        # twice the spread of arrivals plus a second, not 600 s
        assert pool.round()["deadline_s"] == pytest.approx(2 * 0.25 + 1.0, abs=0.05)
        clock.advance(1.6)  # past the deadline: the round closes without b
        info = pool.latest_after(1)
        assert info["version"] == 2 and pool.submissions()[(1, a.pubkey)] == ("accepted", None)
