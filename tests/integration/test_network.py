"""A real uvicorn coordinator on 127.0.0.1 and two real miner processes train for several rounds."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.bucket import incoming_keys
from tests.helpers.cli import gradpool
from tests.helpers.miners import mine_args, start_miner
from tests.helpers.waiting import wait_until


@pytest.mark.slow  # a real network of two miner processes
def test_two_miners_train_three_overlapped_rounds(
    live_coordinator: Callable[..., Any], tmp_path: Path
) -> None:
    """Each miner catches up, starts from its guess of the version being made and merges it if it comes
    mid-round; every hash still matches (a mismatch would fall back to the checkpoint). Synchronous rounds
    run in every other network test. The second miner is given two coordinator URLs, the first of which
    nothing answers (a replica that is down): it mines through the second."""
    with live_coordinator(rounds={"min_quorum": 2, "deadline_s": 60.0, "overlap": True}) as server:
        urls = [server.url, f"http://127.0.0.1:9,{server.url}"]
        procs = [
            start_miner(urls[i], tmp_path / f"m{i}.pem", tmp_path / f"state{i}", tmp_path / f"m{i}.log")
            for i in range(2)
        ]
        try:
            status = server.wait_rounds(3, procs, timeout_s=150)
            records = [httpx.get(f"{server.url}/v1/rounds/{r}", timeout=10).json() for r in range(3)]
        finally:
            for p in procs:
                p.terminate()
            codes = [p.wait(timeout=30) for p in procs]
    rounds = status["rounds"][:3]
    assert [r["version"] for r in rounds] == [1, 2, 3]
    reasons = [(r["round"], s["status"], s.get("reason")) for r in records for s in r["submissions"]]
    assert all(r["accepted"] == 2 and r["rejected"] == 0 for r in rounds), reasons
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["compute_s"] > 0 for r in rounds)
    # a round's wall time runs from its opening to the next one's, which its miners' training lies within
    assert all(r["compute_s"] <= r["wall_s"] + 0.5 for r in rounds), rounds
    assert rounds[-1]["eval_loss"] < status["initial_eval_loss"] - 0.3
    assert status["miners"] == 2
    assert codes == [0, 0], "miners must stop cleanly on SIGTERM"
    logs = "".join((tmp_path / f"m{i}.log").read_text() for i in range(2))
    assert "hash mismatch" not in logs and "loaded checkpoint" in logs
    assert f"trying the replica at {urls[0]}" in (tmp_path / "m1.log").read_text()
    assert logs.count("loaded checkpoint") == 2  # once each, at the start: every later version by update
    for i in range(2):
        assert (tmp_path / f"state{i}" / "miner-state.safetensors").exists()


def test_miner_with_wrong_url_fails_with_one_line(tmp_path: Path) -> None:
    args = mine_args("http://127.0.0.1:9", tmp_path / "k.pem", tmp_path / "s")
    done = gradpool(*args, env={"GRADPOOL_STARTUP_TIMEOUT_S": "1"}, timeout_s=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot reach the coordinator")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_a_miner_downloads_straight_from_the_object_store(
    live_coordinator: Callable[..., Any],
    s3_bucket: dict[str, Any],
    tmp_path: Path,
    overlap: bool,
    request: pytest.FixtureRequest,
) -> None:
    """With redirect_downloads the checkpoint and every published update reach the miner from the S3 store
    (a real S3-compatible server), not through the coordinator, and the miner checks every hash.
    Synchronous rounds: the miner catches up as each round starts; overlapped: version 1 comes out while
    round 1 trains, and the miner merges it (or catches up to it, if it came out first).

    The synchronous network is set up as one beyond one machine is: its state in a real PostgreSQL ([store]
    url) rather than the SQLite file (nothing of it in the state directory; a coordinator started again on
    the same database resumes where the first stopped), and its miner's uploads straight to the bucket
    ([blobs] direct_uploads: a presigned form, then a commit), so that no payload passes through the
    coordinator either way."""
    blobs = {**s3_bucket, "redirect_downloads": True, "direct_uploads": not overlap}
    rounds = {"min_quorum": 1, "deadline_s": 30.0, "overlap": overlap}
    store = {} if overlap else {"url": request.getfixturevalue("postgres_url")}
    with live_coordinator(blobs=blobs, rounds=rounds, store=store) as server:
        args = mine_args(server.url, tmp_path / "m.pem", tmp_path / "state")
        done = gradpool(*args, "--max-rounds", "3", timeout_s=240)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        status = server.wait_rounds(3)
        head = httpx.get(f"{server.url}/v1/round", timeout=10).json()
        if not overlap:  # each direct upload taken from its key, and removed once its round closed
            wait_until(lambda: not incoming_keys(s3_bucket), 30, "the closed rounds' direct uploads removed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "version 0: loaded checkpoint" in done.stderr
    if overlap:
        merged = r"round 1: merged version 1|version 1: caught up from version 0 by 1 published updates"
        assert re.search(merged, done.stderr), done.stderr[-3000:]
    else:
        assert "version 2: caught up from version 1 by 1 published updates" in done.stderr
    assert s3_bucket["s3_endpoint_url"] in done.stderr  # the redirected requests, as the miner logged them
    redirects = next(x for x in metrics.splitlines() if x.startswith("gradpool_download_redirects_total"))
    # the checkpoint and each published update the miner took: version 1 (and 2, in synchronous rounds)
    assert float(redirects.split()[1]) >= (2 if overlap else 3)
    assert [r["accepted"] for r in status["rounds"][:3]] == [1, 1, 1]
    if not overlap:
        assert done.stderr.count("upload taken (sent straight to the object store)") == 3
        assert not (tmp_path / "coordinator" / "state.db").exists()
        with live_coordinator(blobs=blobs, rounds=rounds, store=store) as again:
            resumed = httpx.get(f"{again.url}/v1/round", timeout=10).json()
            versions = [httpx.get(f"{again.url}/v1/versions/{v}", timeout=10).json() for v in range(4)]
        assert (resumed["round"], resumed["version"], resumed["param_hash"]) == (
            head["round"],
            head["version"],
            head["param_hash"],
        )
        assert versions[-1]["param_hash"] == head["param_hash"] and head["version"] == 3
