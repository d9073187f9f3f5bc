"""One coordinator per state directory: an exclusive lock on ``DIR/coordinator.lock`` while it runs (and
while an operator's command such as ``rollback`` changes the state). The kernel releases it when the
process dies, however it dies."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "coordinator.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ValueError(f"another coordinator is using the state directory {state_dir}") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
