"""Real miner processes (``gradpool mine``) against a coordinator on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

from gradpool.processes import Child, Processes


def mine_args(url: str, key: Path, state: Path) -> list[str]:
    """``gradpool mine`` with this key and state, one thread."""
    key_and_state = ["--key", str(key), "--create-key", "--state-dir", str(state)]
    return ["mine", "--coordinator", url, *key_and_state, "--threads", "1"]


def mine_command(url: str, key: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "gradpool", *mine_args(url, key, state)]


def start_miner(url: str, key: Path, state: Path, log: Path) -> Child:
    """A miner process that mines until it is stopped, its output in ``log`` (``NAME.log``)."""
    return Processes(log.parent).start(log.stem, mine_args(url, key, state))
