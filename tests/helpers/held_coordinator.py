"""A coordinator process whose closes never commit: ``gradpool coordinator serve`` with a ``before_commit``
hook that blocks, so that a test can kill it while a round is being closed (tests/integration/test_crash.py).
A test knob kept out of the production settings: the hook is given in code, as any test gives hooks.

``python -m tests.helpers.held_coordinator STATE_DIR CORPUS READY_FILE``; the other settings come from the
GRADPOOL_* environment, as for ``gradpool coordinator serve``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path

from gradpool.processes import Processes, ProcessFailed
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def start_held_coordinator(
    procs: Processes, state: Path, corpus: Path, env: dict[str, str], timeout_s: float = 120.0
) -> str:
    """Start it as ``procs``' process "coordinator" (so ``procs.kill`` and ``stop_all`` reach it); its URL."""
    ready = state.parent / "ready.json"
    ready.unlink(missing_ok=True)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    args = [str(state), str(corpus), str(ready)]
    proc = procs.start(
        "coordinator", args, {**env, "PYTHONPATH": path}, module="tests.helpers.held_coordinator"
    )

    def listening() -> bool:
        if proc.poll() is not None:
            raise ProcessFailed(f"the held coordinator exited at start:\n{procs.tail('coordinator', 20)}")
        return ready.exists()

    wait_until(listening, timeout_s, "the held coordinator to listen")
    return str(json.loads(ready.read_text())["url"])


def main(state_dir: str, corpus: str, ready_file: str) -> None:
    from coordinator.hooks import Hooks
    from coordinator.settings import CoordinatorSettings
    from gradpool.cli import serve_coordinator
    from gradpool.config import load_settings, setup_logging

    overrides = {"state_dir": Path(state_dir), "port": 0, "data": {"corpus": Path(corpus)}}
    settings = load_settings(CoordinatorSettings, None, overrides)
    setup_logging(settings.log_level, settings.log_format)
    never = threading.Event()

    def hold(round_: int) -> None:
        print(f"round {round_}: held before its commit", flush=True)
        never.wait()  # until the test kills this process

    asyncio.run(serve_coordinator(settings, Path(ready_file), Hooks(before_commit=hold)))


if __name__ == "__main__":
    main(*sys.argv[1:])
