"""`gradpool simulate` end to end: processes on 127.0.0.1, a row per round, report.json and loss.png."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROUND_FIELDS = {
    "round",
    "version",
    "eval_loss",
    "accepted",
    "rejected",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "compute_s",
}


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradpool", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )


def test_simulate_writes_a_report_and_stops_its_processes(tmp_path: Path, corpus_file: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text(
        f'[data]\ncorpus = "{corpus_file}"\neval_every = 20\neval_sequences = 16\n'
        "[recipe]\ninner_steps = 4\nbatch_size = 4\nwarmup_steps = 2\nlr = 0.003\n"
        "[validation]\nother_sequences = 32\n"
    )
    out = tmp_path / "run"
    done = simulate("--miners", "2", "--rounds", "3", "--out", str(out), "--config", str(cfg))
    assert done.returncode == 0, done.stderr + done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert all(ROUND_FIELDS <= set(r) for r in report["rounds"])
    assert report["rounds"][-1]["version"] == 3
    assert report["final_eval_loss"] == report["rounds"][-1]["eval_loss"] < report["initial_eval_loss"]
    assert report["config"]["miners"] == 2 and report["config"]["codec"]["name"] == "sparseloco"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coordinator_pid = int(json.loads((out / "coordinator.ready").read_text())["pid"])
    with pytest.raises(ProcessLookupError):
        os.kill(coordinator_pid, 0)  # simulate stopped the processes it started


def test_simulate_fails_cleanly_when_the_coordinator_cannot_start(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('[data]\ncorpus = "/nonexistent/corpus"\n')
    done = simulate("--miners", "1", "--rounds", "1", "--out", str(tmp_path / "run"), "--config", str(cfg))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr and "corpus path" in done.stderr
