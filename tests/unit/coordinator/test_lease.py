"""The leader lease on both backends: one holder at a time, a new token for each taker, and a deposed
holder's writes refused by the fence before they change anything."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from coordinator.storage.lease import Deposed, LeaderLease
from coordinator.storage.store import SqlStore


def test_one_holder_at_a_time_and_a_deposed_one_writes_nothing(store_url: str) -> None:
    a, b = SqlStore(store_url), SqlStore(store_url)
    try:
        assert a.take_lease("a", 100.0, 10.0) == 1
        assert a.take_lease("a", 101.0, 10.0) == 2  # its own: taken again, a new token
        assert b.take_lease("b", 105.0, 10.0) is None  # held until 111
        assert b.lease_holder().holder == "a"
        a.fence("a", 2)
        a.set_meta("k", "a")
        assert a.renew_lease("a", 2, 109.0, 10.0)  # now held until 119
        assert b.take_lease("b", 118.0, 10.0) is None
        assert b.take_lease("b", 120.0, 10.0) == 3  # run out: b takes it
        b.fence("b", 3)
        with pytest.raises(Deposed, match="held by b"):
            a.set_meta("k", "a again")  # a, woken up, changes nothing
        assert not a.renew_lease("a", 2, 121.0, 10.0)
        b.set_meta("k", "b")
        assert a.get_meta("k") == "b"  # reads are anyone's
        b.release_lease("b", 3)
        assert a.take_lease("a", 121.0, 10.0) == 4  # let go: taken at once
        assert b.take_lease("b", 121.0, 10.0, force=True) == 5  # the embedded store's own process
    finally:
        a.close()
        b.close()


def test_a_standby_takes_the_lease_when_the_leader_lets_it_go(store_url: str) -> None:
    leader, standby = SqlStore(store_url), SqlStore(store_url)
    try:
        first = LeaderLease(leader, "leader", lease_s=1.0)
        assert first.acquire() == 1
        second = LeaderLease(standby, "standby", lease_s=1.0)
        taken: list[int] = []
        waiting = threading.Thread(target=lambda: taken.append(second.acquire()))
        waiting.start()
        time.sleep(1.5)  # renewed meanwhile: the standby waits
        assert taken == [] and standby.lease_holder().holder == "leader"
        first.release()
        waiting.join(timeout=5)
        assert taken == [2] and standby.lease_holder().holder == "standby"
        time.sleep(0.5)
        with pytest.raises(Deposed):
            leader.set_meta("k", "v")
        second.release()
    finally:
        leader.close()
        standby.close()


def test_a_run_renews_its_lease_from_the_moment_it_takes_it(
    postgres_url: str, make_settings: Callable[..., CoordinatorSettings]
) -> None:
    """Building a run (loading the model, its first held-out loss) can take longer than the lease: the lease
    is renewed from when it is taken, not from when the run starts serving."""
    run = Run(make_settings(store={"url": postgres_url}, cluster={"lease_s": 1.0, "name": "a"}))
    other = SqlStore(postgres_url)
    try:
        time.sleep(2.5)  # not started: no closer, no server, the lease two lifetimes old
        assert other.take_lease("b", time.time(), 1.0) is None
        assert other.lease_holder().holder == "a" and not run.lease.lost.is_set()
    finally:
        other.close()
        run.close()
