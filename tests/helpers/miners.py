"""Real miner processes (``gradpool mine``) against a coordinator on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def mine_command(url: str, key: Path, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gradpool",
        "mine",
        "--coordinator",
        url,
        "--key",
        str(key),
        "--create-key",
        "--state-dir",
        str(state),
        "--threads",
        "1",
    ]


def start_miner(url: str, key: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """A miner process that mines until it is stopped, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            mine_command(url, key, state), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
