"""The chaos soak, for 45 seconds: processes killed at random and started again (every 8 s on average, the
coordinator every other time), and every check of the soak holding (benchmarks/chaos.py, which runs the
10-minute soak: `--minutes 10 --json`)."""

from __future__ import annotations

import pytest

from benchmarks.chaos import main

pytestmark = pytest.mark.slow  # 45 s of a real network under kills


@pytest.mark.timeout(400)
def test_kills_at_random_break_nothing() -> None:
    result = main(["--minutes", "0.75", "--interval-s", "8", "--miners", "3", "--hostile", "lutscale"])
    assert result["violations"] == []
    assert result["kills"]["coordinator"] >= 2 and sum(result["kills"].values()) >= 3
    assert result["rounds"] >= 2 and result["versions"] >= 2
    assert result["final_eval_loss"] < result["initial_eval_loss"]
