"""Local networks of ``python -m gradpool`` processes: the simulator, the compose check, the crash and
chaos tests and the benchmarks start their coordinators and nodes here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A process that had to start or keep running did not."""


class Processes:
    """Named child processes, a log file each (appended to across restarts); ``stop_all`` stops every one
    of them, whatever happened."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir, self.env = log_dir, env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``python -m gradpool ARGS``, run through ``prefix`` if given (e.g. ``ip netns exec NS``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        command = [*(prefix or []), sys.executable, "-m", "gradpool", *args]
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
            )
        return self.procs[name]

    def start_coordinator(
        self,
        args: list[str],
        ready: Path,
        name: str = "coordinator",
        env: dict[str, str] | None = None,
        timeout_s: float = 180.0,
    ) -> str:
        """Start ``gradpool coordinator serve ARGS --ready-file READY`` and wait until it listens; its URL."""
        ready.unlink(missing_ok=True)
        proc = self.start(name, ["coordinator", "serve", *args, "--ready-file", str(ready)], env)
        end = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None:
                raise ProcessFailed(f"the coordinator exited at start:\n{self.tail(name, 20)}")
            if time.monotonic() > end:
                raise ProcessFailed(f"the coordinator did not start within {timeout_s:.0f} s")
            time.sleep(0.05)
        return str(json.loads(ready.read_text())["url"])

    def kill(self, name: str) -> None:
        """SIGKILL, and wait for it to be gone."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)

    def dead(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 5) -> str:
        return "\n".join(self.log(name).strip().splitlines()[-lines:])

    def stop(self, name: str, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; its exit code."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def stop_all(self, grace_s: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
