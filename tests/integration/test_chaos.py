"""The chaos soak, for a minute: processes killed at random and started again, and every check of the
soak holding (benchmarks/chaos.py, which runs the 10-minute soak: `--minutes 10 --json`)."""

from __future__ import annotations

import pytest

from benchmarks.chaos import main

pytestmark = pytest.mark.slow  # a minute of a real network under kills


@pytest.mark.timeout(400)
def test_a_minute_of_kills_breaks_nothing() -> None:
    result = main(["--minutes", "1", "--interval-s", "10", "--miners", "3", "--hostile", "lutscale"])
    assert result["violations"] == []
    assert result["kills"]["coordinator"] >= 2 and sum(result["kills"].values()) >= 3
    assert result["rounds"] >= 2 and result["versions"] >= 2
    assert result["final_eval_loss"] < result["initial_eval_loss"]
