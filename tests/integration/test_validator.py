"""A real validator process evaluates closed rounds of a real network and its verdicts match the
coordinator's own evaluation of the same uploads."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.evaluation import LOSS_FIELDS
from tests.helpers.cli import gradpool
from tests.helpers.miners import start_miner

pytestmark = pytest.mark.slow  # a real network of miners and a validator


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlapped"])
def test_validator_agrees_with_the_coordinator(
    live_coordinator: Callable[..., Any], tmp_path: Path, overlap: bool
) -> None:
    """Overlapped rounds: the validator waits for each round to close and evaluates its uploads on the
    version they were applied to, as the coordinator did."""
    settings = {
        "rounds": {"min_quorum": 2, "deadline_s": 60.0, "overlap": overlap},
        "validation": {"own_sequences": 16, "other_sequences": 16},
    }
    with live_coordinator(**settings) as server:
        miners = [
            start_miner(server.url, tmp_path / f"m{i}.pem", tmp_path / f"s{i}", tmp_path / f"m{i}.log")
            for i in range(2)
        ]
        key_and_state = ["--key", str(tmp_path / "v.pem"), "--create-key", "--state-dir", str(tmp_path / "v")]
        validator = gradpool(
            "validate",
            "--coordinator",
            server.url,
            *key_and_state,
            "--threads",
            "1",
            "--max-rounds",
            "2",
            timeout_s=240,
        )
        try:
            assert validator.returncode == 0, validator.stderr[-2000:]
            server.wait_rounds(2, miners, timeout_s=60)
            board = httpx.get(f"{server.url}/v1/leaderboard", timeout=10).json()
        finally:
            for p in miners:
                p.terminate()
            for p in miners:
                p.wait(timeout=30)
        db_path = server.app.state.run.settings.state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute(
            f"SELECT round, miner, validator, {', '.join(LOSS_FIELDS)} FROM verdicts"
        ).fetchall()
    own = {(r, m): v for r, m, who, *v in rows if who == "coordinator"}
    theirs = {(r, m): v for r, m, who, *v in rows if who != "coordinator"}
    assert len({row[2] for row in rows} - {"coordinator"}) == 1  # one validator besides the coordinator
    assert theirs and set(theirs) <= set(own)
    for key, values in theirs.items():
        assert values == pytest.approx(own[key], abs=1e-4), key
    assert "posted 2 verdicts" in validator.stderr
    assert {e["miner"] for e in board["miners"]} == {m for _, m in own}
