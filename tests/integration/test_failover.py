"""Two coordinator processes on one PostgreSQL and one S3 bucket: the one holding the leader lease serves
the run, the other passes every request on to it (a miner can work through either); when the leader stops
answering, the standby takes the lease and carries the run on where it was, and the old leader, woken up,
commits nothing and stops."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from gradpool.processes import Processes
from protocol.signing import generate_key, save_key
from tests.helpers.cli import gradpool
from tests.helpers.miners import QUICK_ROUNDS, mine_args
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # two coordinators and two miner runs as processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_standby_takes_over_from_a_leader_that_stops_and_the_old_one_commits_nothing(
    tmp_path: Path, corpus_file: Path, postgres_url: str, s3_bucket: dict[str, Any]
) -> None:
    procs = Processes(tmp_path, env=QUICK_ROUNDS)
    ports = {name: free_port() for name in ("a", "b")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    save_key(
        generate_key(), tmp_path / "coordinator.pem"
    )  # the network's key, which every process signs with
    for name in ports:
        config = {
            "state_dir": str(tmp_path / name),
            "data": {"corpus": str(corpus_file)},
            "store": {"url": postgres_url},
            "blobs": s3_bucket,
            "cluster": {"lease_s": 2.0, "name": name},
            "identity": {"key": str(tmp_path / "coordinator.pem")},
            "rounds": {"overlap": False},
        }
        (tmp_path / f"{name}.toml").write_text(tomli_w.dumps(config))

    def serve(name: str) -> list[str]:
        return ["--config", str(tmp_path / f"{name}.toml"), "--port", str(ports[name])]

    def mine_one_round(via: str) -> subprocess.CompletedProcess[str]:
        args = mine_args(via, tmp_path / "m.pem", tmp_path / "m")
        return gradpool(*args, "--max-rounds", "1", timeout_s=180)

    def get(name: str, path: str) -> Any:
        return httpx.get(f"{urls[name]}{path}", timeout=10).json()

    try:
        procs.start_coordinator(serve("a"), tmp_path / "a.json", name="a", timeout_s=120)
        procs.start("b", ["coordinator", "serve", *serve("b"), "--ready-file", str(tmp_path / "b.json")])
        wait_until(lambda: "standing by: a holds the leader lease" in procs.log("b"), 60, "b to stand by")
        assert not (tmp_path / "b.json").exists()
        wait_until(lambda: "standing by on port" in procs.log("b"), 60, "b to listen")
        through_b = httpx.get(f"{urls['b']}/v1/round", timeout=10)  # answered by the leader, through b
        assert through_b.status_code == 200, through_b.text
        assert (through_b.headers["x-gradpool-replica"], through_b.headers["x-gradpool-leader"]) == ("b", "a")
        assert through_b.json()["round"] == get("a", "/v1/round")["round"] == 0
        status = gradpool("status", "--coordinator", urls["b"])
        assert status.returncode == 0 and "(replica b, leader a)" in status.stdout, status.stderr

        first = mine_one_round(urls["b"])  # everything through the standby: signed, uploads, downloads
        assert first.returncode == 0, first.stderr[-2000:]
        wait_until(lambda: get("a", "/v1/round")["version"] == 1, 60, "round 0 to publish version 1")
        assert len(get("a", "/v1/rounds/0")["submissions"]) == 1  # the upload that came through b
        v1 = get("a", "/v1/versions/1")

        procs.procs["a"].send_signal(signal.SIGSTOP)  # the leader stops answering and renewing
        stopped = time.monotonic()
        wait_until(lambda: (tmp_path / "b.json").exists(), 60, "b to take over")
        failover_s = time.monotonic() - stopped
        assert "took the leader lease" in procs.log("b")
        assert get("b", "/v1/versions/1") == v1 and get("b", "/v1/round")["round"] == 1

        procs.procs["a"].send_signal(signal.SIGCONT)  # the old leader wakes up: fenced, it stops
        assert procs.procs["a"].wait(timeout=30) == 1
        assert "lost the leader lease" in procs.log("a")

        second = mine_one_round(f"{urls['a']},{urls['b']}")  # a, first in the list, answers nothing now
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"trying the replica at {urls['b']}" in second.stderr
        wait_until(lambda: get("b", "/v1/round")["version"] == 2, 60, "round 1 to publish version 2")
        history = get("b", "/v1/history")
        assert [r["record"]["version"] for r in history["records"]] == [0, 1, 2]  # each published once
    finally:
        procs.stop_all()
    print(json.dumps({"failover_s": round(failover_s, 2)}))
