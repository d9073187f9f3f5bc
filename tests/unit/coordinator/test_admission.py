"""Admission: new keys beyond ``[admission]``'s limits a minute wait (429, Retry-After) while keys that
registered before carry on; an allowlist file admits only its keys and is read again when it changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from tests.helpers.clock import ManualClock
from tests.helpers.pool import Miner, OpenPool, assert_error


@pytest.mark.parametrize(
    ("limits", "where"),
    [({"per_address_per_minute": 3}, "from one address"), ({"per_minute": 3}, "in all")],
    ids=["per-address", "overall"],
)
def test_new_keys_beyond_a_limit_wait_and_known_ones_do_not(
    open_pool: OpenPool, limits: dict[str, int], where: str
) -> None:
    clock = ManualClock()
    with open_pool(admission=limits, app={"clock": clock}) as pool:

        def register(m: Miner) -> int:
            return int(m.post("/v1/miners", now=clock.now()).status_code)

        first = [Miner(pool.client) for _ in range(3)]
        assert [register(m) for m in first] == [200, 200, 200]
        late = Miner(pool.client)
        refused = late.post("/v1/miners", now=clock.now())
        assert_error(refused, 429, "too_many_registrations")
        assert where in refused.json()["error"]["message"] and refused.headers["Retry-After"] == "60"
        assert [register(m) for m in first] == [200, 200, 200]  # registered before: never counted again
        clock.advance(30)
        assert late.post("/v1/miners", now=clock.now()).headers["Retry-After"] == "30"
        clock.advance(31)  # the first three have left the window
        assert register(late) == 200
        assert pool.client.get("/v1/status").json()["miners"] == 4


def test_an_allowlist_file_admits_its_keys_and_is_read_again_when_it_changes(
    open_pool: OpenPool, tmp_path: Path
) -> None:
    listed = tmp_path / "allowlist.txt"
    with open_pool(admission={"mode": "allowlist", "allowlist_file": listed}) as pool:
        a, b = Miner(pool.client), Miner(pool.client)
        listed.write_text(f"# the operator's miners\n{a.pubkey.upper()}  # a\n\n")
        assert a.register().status_code == 200
        assert_error(b.register(), 403, "not_allowed")
        listed.write_text(f"{a.pubkey}\n{b.pubkey}\n")
        assert b.register().status_code == 200  # no restart
        listed.unlink()  # a file being replaced locks nobody out: the keys read last stand
        assert b.register().status_code == 200


def test_allowlist_mode_needs_keys(make_settings: Callable[..., CoordinatorSettings]) -> None:
    with pytest.raises(ValueError, match="needs allowlist or"):
        make_settings(admission={"mode": "allowlist"})
