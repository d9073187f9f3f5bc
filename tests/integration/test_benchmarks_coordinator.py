"""The coordinator benchmark end to end, at toy size: aggregation rows and a real coordinator's intake."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.coordinator import main
from benchmarks.postgres import pg_bin

# generous: the run takes about 40 s on two busy cores
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
ROW_FIELDS = {
    "submissions",
    "params",
    "seconds",
    "single_decode_seconds",
    "rss_increase_bytes",
    "model_fp32_bytes",
    "rss_ratio",
    "seconds_vs_target",
}


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = main(
            [
                "--json",
                "--sets=tiny",
                "--sizes=3",
                "--miners=8",
                "--threads=1",
                "--reps=1",
                "--close-sizes=2",
                "--cluster-miners=6",
                *([] if pg_bin() else ["--skip-cluster"]),  # its test skips (CI has PostgreSQL)
            ]
        )
    assert json.loads(out.getvalue()) == json.loads(json.dumps(returned))  # stdout holds the JSON only
    return returned


def test_aggregation_rows(result: dict[str, Any]) -> None:
    rows = result["aggregation"]
    assert [(r["set"], r["submissions"]) for r in rows] == [("tiny", 3)]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["seconds"] > 0 and row["single_decode_seconds"] > 0
        assert isinstance(row["rss_increase_bytes"], int) and isinstance(row["model_fp32_bytes"], int)
        # the running sum alone is one fp32 copy of the model
        assert row["rss_increase_bytes"] >= row["model_fp32_bytes"]
        assert row["model_fp32_bytes"] == 4 * row["params"]
        assert row["seconds_vs_target"] == pytest.approx(
            row["seconds"] / (0.5 * row["submissions"] * row["single_decode_seconds"])
        )


def test_ingest_stores_every_upload(result: dict[str, Any]) -> None:
    ingest = result["ingest"]
    assert ingest["miners"] == 8
    assert ingest["failures"] == 0, ingest["errors"]
    assert ingest["stored"] == 8
    assert 0 < ingest["p50_s"] <= ingest["p99_s"] <= ingest["max_s"]


def test_presigned_uploads_through_two_replicas_leave_the_payloads_out_of_the_coordinators(
    result: dict[str, Any], postgres_bin: Path
) -> None:
    cluster = result["cluster"]
    assert (cluster["miners"], cluster["replicas"]) == (6, 2)
    assert cluster["failures"] == 0, cluster["errors"]
    assert cluster["stored"] == 6  # three of them committed through the standby
    assert cluster["bucket_bytes_in"] == 6 * cluster["payload_bytes"]
    assert 0 < cluster["coordinator_bytes_in"] < cluster["bucket_bytes_in"] / 10  # tickets and commits only
    assert 0 < cluster["p50_s"] <= cluster["p99_s"] <= cluster["max_s"]


def test_a_round_of_real_uploads_closes_with_every_one_evaluated(result: dict[str, Any]) -> None:
    (row,) = result["close"]
    assert row["uploads"] == 2 and row["evaluated"] == 2 and row["accepted"] >= 1
    assert 0 < row["evaluation_s"] < row["seconds"] <= row["wall_s"]
    # overlapped rounds (the default): the version comes out before the evaluation of its uploads ends
    assert 0 < row["version_s"] < row["seconds"]


def test_targets_listed(result: dict[str, Any]) -> None:
    checks = {t["check"]: t["met"] for t in result["targets"]}
    assert checks["ingest failures"] is True
    assert "ingest p99_s" in checks
    if pg_bin():
        assert checks["cluster failures"] is True and "cluster p99_s" in checks
