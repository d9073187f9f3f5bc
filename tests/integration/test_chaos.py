"""The chaos soak, for 2 minutes, as a network beyond one machine runs: two coordinator processes on a real
PostgreSQL and a real S3-compatible server, processes killed at random and started again (every 8 s on
average, a coordinator process every other time, the leader two times in three), PostgreSQL restarted
once, and every check of the soak holding (benchmarks/chaos.py, which runs the 10-minute soaks: `--minutes
10 --json`, and with `--replicas 2 --store postgres`). The single coordinator's restarts are tested in
test_crash.py and test_miner_resilience.py."""

from __future__ import annotations

import pytest

from benchmarks.chaos import main

pytestmark = pytest.mark.slow  # 2 minutes of a real network under kills


@pytest.mark.timeout(600)
def test_kills_at_random_break_nothing(postgres_bin: object) -> None:  # the soak starts its own server
    # seed 4: its first coordinator kill is of the leader (seed 0's, of the standby); a lease of 6 s outlasts
    # the PostgreSQL restart on a loaded machine (at 3 s the leader, unable to renew, rightly stepped down)
    args = ["--minutes", "2", "--interval-s", "8", "--miners", "3", "--hostile", "lutscale", "--seed", "4"]
    result = main([*args, "--replicas", "2", "--store", "postgres", "--lease-s", "6"])
    assert result["violations"] == []
    assert result["kills"]["leader"] >= 1 and sum(result["kills"].values()) >= 3
    assert len(result["failover_s"]) == result["kills"]["leader"]
    assert result["kills"]["postgres"] == 1
    assert result["rounds"] >= 2 and result["versions"] >= 2
    assert result["final_eval_loss"] < result["initial_eval_loss"]
