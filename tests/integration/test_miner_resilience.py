"""A miner left running: it outlives a coordinator restart, resumes its exact state after SIGKILL, and
catches up by published updates after a short absence or by the checkpoint after a long one."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file

from gradpool.processes import Child, Processes
from node.state import STATE_FILE, state_digest
from tests.helpers.miners import QUICK_ROUNDS
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # real miner processes through restarts

ENV = {
    **QUICK_ROUNDS,
    "GRADPOOL_MAX_CATCHUP_VERSIONS": "3",
}


class Network:
    """A coordinator and miners as processes, the coordinator on the same port across restarts; overlapped
    rounds, as in production."""

    def __init__(self, root: Path, corpus: Path) -> None:
        self.root, self.corpus = root, corpus
        self.procs = Processes(root, env=ENV)
        self.port = 0
        self.url = ""

    def start_coordinator(self) -> None:
        args = [
            "--state-dir",
            str(self.root / "coordinator"),
            "--corpus",
            str(self.corpus),
            "--port",
            str(self.port),
        ]
        self.url = self.procs.start_coordinator(args, self.root / "ready.json", timeout_s=120)
        self.port = int(self.url.rsplit(":", 1)[1])

    def start_miner(self, name: str, *extra: str) -> Child:
        args = [
            "mine",
            "--coordinator",
            self.url,
            "--key",
            str(self.root / f"{name}.pem"),
            "--create-key",
            "--state-dir",
            str(self.state_dir(name)),
            "--threads",
            "1",
            *extra,
        ]
        return self.procs.start(name, args)

    def state_dir(self, name: str) -> Path:
        return self.root / f"{name}-state"

    def log(self, name: str) -> str:
        return self.procs.log(name)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=10).json()
        return result

    def wait(
        self, condition: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 120
    ) -> dict[str, Any]:
        def met() -> dict[str, Any] | None:
            try:
                status = self.status()
            except httpx.HTTPError:  # the coordinator is restarting
                return None
            return status if condition(status) else None

        return wait_until(met, timeout_s, what, interval_s=0.2)

    def stop(self) -> None:
        self.procs.stop_all(grace_s=30)

    def wait_log(self, name: str, text: str, timeout_s: float = 60) -> str:
        """Until ``name``'s log holds ``text``; the first line that does."""

        def logged() -> list[str]:
            return [line for line in self.log(name).splitlines() if text in line]

        try:
            return wait_until(logged, timeout_s, f"{name} to log {text!r}", interval_s=0.1)[0]
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log(name)[-2000:]}") from None


def version(status: dict[str, Any]) -> int:
    return int(status["round"]["version"])


def test_a_miner_outlives_a_coordinator_restart_mid_round(tmp_path: Path, corpus_file: Path) -> None:
    net = Network(tmp_path, corpus_file)
    try:
        net.start_coordinator()
        miner = net.start_miner("m", "--metrics-port", "0")
        metrics_url = net.wait_log("m", "metrics on http://").rsplit(" ", 1)[1]
        net.wait(lambda s: version(s) >= 2, "two versions")
        net.procs.kill("coordinator")
        net.wait_log("m", "retrying in")  # the coordinator is gone; the miner must wait, not die
        assert miner.poll() is None, net.log("m")
        net.start_coordinator()
        net.wait(lambda s: version(s) >= 5, "three more versions after the restart")
        assert miner.poll() is None
        metrics = httpx.get(metrics_url, timeout=10).text
    finally:
        net.stop()
    assert "retrying in" in net.log("m")
    mined = next(line for line in metrics.splitlines() if line.startswith("gradpool_miner_rounds_total "))
    assert float(mined.split()[1]) >= 4


def test_sigkill_and_restart_resume_the_exact_saved_state(tmp_path: Path, corpus_file: Path) -> None:
    net = Network(tmp_path, corpus_file)
    try:
        net.start_coordinator()
        miner = net.start_miner("m")
        net.wait(lambda s: version(s) >= 3, "a few rounds mined")
        miner.send_signal(signal.SIGKILL)  # wherever it is: training, uploading or saving
        miner.wait(timeout=30)
        on_disk = state_digest(
            {k[3:]: t for k, t in load_file(net.state_dir("m") / STATE_FILE).items() if k.startswith("ef/")}
        )
        restarted = net.start_miner("m", "--max-rounds", "1")
        assert restarted.wait(timeout=120) == 0, net.log("m")
    finally:
        net.stop()
    resumed = [line for line in net.log("m").splitlines() if "resumed state from" in line]
    assert len(resumed) == 1 and resumed[0].endswith(f"error feedback {on_disk}")
    assert "unreadable" not in net.log("m")


def test_catch_up_by_updates_after_a_short_absence_and_by_checkpoint_after_a_long_one(
    tmp_path: Path, corpus_file: Path
) -> None:
    """At the production default, overlapped rounds: a miner that starts while the round behind is still
    being closed catches up to the version before the one being made, so the version it reaches is one of
    two. (Catching up is the miner's own business, the same in both modes: synchronous rounds bring it
    nothing to test that this lacks.)"""
    net = Network(tmp_path, corpus_file)

    def mine(name: str, rounds: int) -> str:
        """Run a miner for some rounds; the part of its log this run wrote."""
        before = len(net.log(name)) if (tmp_path / f"{name}.log").exists() else 0
        assert net.start_miner(name, "--max-rounds", str(rounds)).wait(timeout=120) == 0, net.log(name)
        return net.log(name)[before:]

    try:
        net.start_coordinator()
        mine("away", 1)  # trains on version 0 (its saved base), publishes 1
        mine("steady", 2)  # -> 3, without the absent miner
        short = mine("away", 1)  # from its base 0 to 3 (3 updates), trains, publishes 4
        mine("steady", 5)  # -> 9
        long = mine("away", 1)  # from its base 3 to 9: more than max_catchup_versions (3)
    finally:
        net.stop()
    caught = re.findall(r"version (\d+): caught up from version 0 by (\d+) published updates", short)
    assert len(caught) == 1 and int(caught[0][0]) in {2, 3} and int(caught[0][1]) == int(caught[0][0]), short
    assert "loaded checkpoint" not in short
    # the steady miner's 5 rounds put the network more than max_catchup_versions (3) ahead of the away one
    loaded = re.findall(r"version (\d+): loaded checkpoint", long)
    assert len(loaded) == 1 and int(loaded[0]) - int(caught[0][0]) > 3 and "caught up" not in long, long
