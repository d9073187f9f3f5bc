"""The compressed downlink: what a miner downloads per round is about one upload's size, it reaches the
coordinator's version bit for bit, the coordinator's error feedback survives a restart, and a broken update
sends the miner to the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import torch
from pool_harness import SPEC, Miner, OpenPool, Pool, ThroughTestClient, payload

from node.client import CoordinatorClient
from node.follower import Follower
from protocol.params import decode_update, params_hash
from protocol.signing import generate_key
from protocol.wire import RunInfo

SPARSE = {"codec": "sparseloco"}  # the default; the other API tests publish exactly


class Catcher(Follower):
    """A node's follower: where a miner stands, and how it catches up."""

    def __init__(self, pool: Pool, tmp: Path, transport: httpx.BaseTransport | None = None) -> None:
        self.client = CoordinatorClient("http://testserver", generate_key(),
                                        transport=transport or ThroughTestClient(pool.client))  # fmt: skip
        self.info = RunInfo.model_validate(pool.client.get("/v1/info").json())
        self.spec, self.device, self.partial_dir = SPEC, torch.device("cpu"), tmp
        self.params, self.version, self.verified = {}, -1, False


def rounds(pool: Pool, miners: list[Miner], first: int, last: int) -> None:
    for r in range(first, last):
        v = pool.round()["version"]
        for i, m in enumerate(miners):
            assert m.upload(r, payload(r, v, seed=100 * r + i)).status_code == 200
        pool.wait_for_round(r)


def test_a_miner_four_versions_behind_catches_up_through_four_compressed_updates(
    open_pool: OpenPool, tmp_path: Path
) -> None:
    with open_pool(publish=SPARSE, rounds={"min_quorum": 3}) as pool:
        miners = [pool.miner() for _ in range(3)]
        rounds(pool, miners, 0, 1)
        behind = Catcher(pool, tmp_path)
        behind.catch_up(1, pool.round()["param_hash"])
        rounds(pool, miners, 1, 5)
        upload = len(payload(0, 0))
        for v in range(2, 6):
            r = pool.client.get(f"/v1/versions/{v}/update")
            header, _ = decode_update(r.content, SPEC)
            assert (header.codec, header.base_version, header.version) == ("sparseloco", v - 1, v)
            assert len(r.content) <= 2.5 * upload, (len(r.content), upload)  # 3 miners' union, compressed
            assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        now = pool.round()
        behind.catch_up(5, now["param_hash"])
        assert (behind.version, params_hash(behind.params, SPEC)) == (5, now["param_hash"])


def test_the_coordinators_error_feedback_survives_a_restart(open_pool: OpenPool, tmp_path: Path) -> None:
    """The same uploads make the same versions whether or not the coordinator restarts between rounds."""
    keys = [generate_key() for _ in range(2)]

    def run(restart: bool, sub: str) -> list[str]:
        state = {"state_dir": tmp_path / sub}
        with open_pool(publish=SPARSE, rounds={"min_quorum": 2}, **state) as pool:
            miners = [Miner(pool.client, k) for k in keys]
            for m in miners:
                m.register()
            rounds(pool, miners, 0, 2)
            if not restart:
                rounds(pool, miners, 2, 4)
                return [pool.client.get(f"/v1/versions/{v}").json()["param_hash"] for v in range(1, 5)]
        with open_pool(publish=SPARSE, rounds={"min_quorum": 2}, **state) as pool:
            miners = [Miner(pool.client, k) for k in keys]
            rounds(pool, miners, 2, 4)
            return [pool.client.get(f"/v1/versions/{v}").json()["param_hash"] for v in range(1, 5)]

    assert run(restart=True, sub="a") == run(restart=False, sub="b")


class Corrupting(httpx.BaseTransport):
    """Answers through the test client, with every published update's last bytes changed."""

    def __init__(self, inner: ThroughTestClient) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        if request.url.path.endswith("/update"):
            return httpx.Response(r.status_code, headers=r.headers, content=r.content[:-8] + b"\xff" * 8)
        return r


def test_a_broken_update_sends_the_miner_to_the_checkpoint(
    open_pool: OpenPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_pool(publish=SPARSE, rounds={"min_quorum": 1}) as pool:
        miner = pool.miner()
        rounds(pool, [miner], 0, 1)
        follower = Catcher(pool, tmp_path, Corrupting(ThroughTestClient(pool.client)))
        follower.catch_up(1, pool.round()["param_hash"])
        rounds(pool, [miner], 1, 2)
        now = pool.round()
        with caplog.at_level(logging.WARNING, logger="node.follower"):
            follower.catch_up(2, now["param_hash"])
    assert (follower.version, params_hash(follower.params, SPEC)) == (2, now["param_hash"])
    assert any("downloading checkpoint" in r.getMessage() for r in caplog.records)
