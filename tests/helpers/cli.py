"""The command line as a user runs it: ``gradpool ARGS`` in a process of its own (forked from the fork
server, so that a short command costs no import), its exit code, stdout and stderr."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gradpool.processes import run


def gradpool(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run(list(args), env=env, timeout_s=timeout_s, cwd=cwd)
