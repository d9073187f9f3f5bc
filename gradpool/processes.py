"""Local networks of ``python -m gradpool`` processes: the simulator, the compose check, the crash and
chaos tests and the benchmarks start their coordinators and nodes here.

Each is a process of its own, forked from a fork server that has already imported what the commands need
(torch, the coordinator, the nodes): a fresh interpreter spends about 3.5 s of CPU importing them (half of
it torch's compiler stack, which torch.optim pulls in on the first optimizer), paid once per network
instead of once per process. The fork server never runs a tensor operation, so no thread pool or CUDA
context is forked. A process run through a ``prefix`` (``ip netns exec NS``), or where the platform has no
fork server, starts as a fresh interpreter."""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

from setproctitle import setproctitle

# what the fork server imports once for every process it starts
PRELOAD = [
    "gradpool.cli",
    "gradpool.node_commands",
    "node.adversary",
    "node.miner",
    "node.validator",
    "coordinator.api.app",
    "coordinator.api.server",
    "coordinator.run",
    "torch._dynamo",
]


class Child(Protocol):
    """What a started process offers: a ``subprocess.Popen``, or a ``Forked`` one."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class Forked:
    """A ``python -m gradpool`` process forked from the fork server."""

    def __init__(self, process: BaseProcess, args: list[str]) -> None:
        self.process, self.args = process, args

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(["gradpool", *self.args], timeout or 0.0)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _become(
    args: list[str], env: dict[str, str], cwd: str, log: str, err: str | None = None, module: str = "gradpool"
) -> None:
    """In the forked process: become ``python -m MODULE ARGS`` (``gradpool``) in this environment, output to
    ``log`` (standard error too, or to ``err``)."""
    # what ps shows: the command, not the fork server's (first: it finds the title's memory by environ)
    setproctitle(" ".join([module, *args]))
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for target, path in ((1, log), (2, err or log)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # what ``python -m MODULE`` runs


@functools.cache
def _fork_server() -> ForkServerContext | None:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, ForkServerContext)
    context.set_forkserver_preload(PRELOAD)
    return context


def fresh_context() -> multiprocessing.context.BaseContext:
    """Where a benchmark measures in a process of its own: forked from the fork server (it has imported what
    the commands need and never run a tensor operation, so no memory peak, cache or thread pool carries
    over), or spawned where the platform has none."""
    return _fork_server() or multiprocessing.get_context("spawn")


def run(
    args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m gradpool ARGS`` to its end, as ``subprocess.run`` with captured output would run it, but
    forked from the fork server (a short command then costs no import): its exit code, stdout, stderr."""
    context = _fork_server()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if context is None:
        command = [sys.executable, "-m", "gradpool", *args]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=full_env,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
    with tempfile.TemporaryDirectory(prefix="gradpool-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        process = context.Process(
            target=_become, args=(args, full_env, str(cwd or os.getcwd()), str(out), str(err))
        )
        process.start()
        process.join(timeout_s)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["gradpool", *args], timeout_s)
        read = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
        return subprocess.CompletedProcess(["gradpool", *args], process.exitcode, *read)


class ProcessFailed(RuntimeError):
    """A process that had to start or keep running did not."""


class Processes:
    """Named child processes, a log file each (appended to across restarts); ``stop_all`` stops every one
    of them, whatever happened."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir, self.env = log_dir, env or {}
        self.procs: dict[str, Child] = {}

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        module: str = "gradpool",
    ) -> Child:
        """``python -m gradpool ARGS`` (or another ``module``), run through ``prefix`` if given (e.g. ``ip
        netns exec NS``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        context = None if prefix else _fork_server()
        if context is not None:
            process = context.Process(
                target=_become,
                args=(args, full_env, os.getcwd(), str(self.log_path(name)), None, module),
                name=name,
                daemon=True,  # ends with the process that started it, if nothing stopped it before
            )
            process.start()
            self.procs[name] = Forked(process, args)
            return self.procs[name]
        command = [*(prefix or []), sys.executable, "-m", module, *args]
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
        return {n: code for n, p in self.procs.items() if (code := p.poll()) is not None}

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
        return proc.wait()

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


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: state, ppid, ..., utime at index 11."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu(fields: list[str], waited: bool = False) -> float:
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if waited else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux's /proc)."""
    return _cpu(_stat(pid))


def tree_cpu_seconds(pid: int) -> float:
    """A process's CPU time with its children's: those that ended (it has waited for them) and those that
    run now (a server and its workers, say)."""
    total = _cpu(_stat(pid), waited=True)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # gone, or not a process
                fields = _stat(proc.name)
                if int(fields[1]) == pid:
                    total += _cpu(fields)
    return total
