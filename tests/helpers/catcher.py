"""A node's follower over an in-process pool (how a miner stands and catches up, node/follower.py), and
rounds of seeded uploads that make the pool's versions."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from node.client import CoordinatorClient
from node.follower import Follower
from protocol.signing import generate_key
from protocol.wire import RunInfo
from tests.helpers.pool import SPEC, Miner, Pool, ThroughTestClient, payload


class Catcher(Follower):
    """A node's follower: where a miner stands, and how it catches up."""

    def __init__(self, pool: Pool, tmp: Path, transport: httpx.BaseTransport | None = None) -> None:
        self.client = CoordinatorClient(
            "http://testserver", generate_key(), transport=transport or ThroughTestClient(pool.client)
        )
        self.info = RunInfo.model_validate(pool.client.get("/v1/info").json())
        self.spec, self.device, self.partial_dir = SPEC, torch.device("cpu"), tmp
        self.params, self.version, self.verified = {}, -1, False


def rounds(pool: Pool, miners: list[Miner], first: int, last: int) -> None:
    """Rounds ``first`` to ``last - 1``: each miner uploads a seeded payload on the newest version."""
    for r in range(first, last):
        v = pool.latest()["version"]  # what a miner trains from: the newest version
        for i, m in enumerate(miners):
            assert m.upload(r, payload(r, v, seed=100 * r + i)).status_code == 200
        pool.wait_for_round(r)
