"""A node's follower over an in-process pool (how a miner stands and catches up, node/follower.py), rounds
of seeded uploads that make the pool's versions, and the same run with and without a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.client import CoordinatorClient
from node.follower import Follower
from protocol.signing import generate_key
from protocol.wire import RunInfo
from tests.helpers.pool import SPEC, Miner, OpenPool, Pool, ThroughTestClient, payload


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


def four_versions(
    open_pool: OpenPool,
    state_dir: Path,
    restart: bool,
    settings: dict[str, Any],
    stopped: Callable[[Path], None] = lambda _: None,
) -> list[str]:
    """The parameter hashes of versions 1 to 4, made by two fixed keys' seeded uploads, with the coordinator
    stopped and started again after version 2 when ``restart`` (``stopped`` sees the state directory then)."""
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([40 + i]) * 32) for i in range(2)]
    with open_pool(**settings, state_dir=state_dir) as pool:
        miners = [Miner(pool.client, k) for k in keys]
        for m in miners:
            m.register()
        rounds(pool, miners, 0, 2)
        if not restart:
            rounds(pool, miners, 2, 4)
            return [pool.client.get(f"/v1/versions/{v}").json()["param_hash"] for v in range(1, 5)]
    stopped(state_dir)
    with open_pool(**settings, state_dir=state_dir) as pool:
        rounds(pool, [Miner(pool.client, k) for k in keys], 2, 4)
        return [pool.client.get(f"/v1/versions/{v}").json()["param_hash"] for v in range(1, 5)]
