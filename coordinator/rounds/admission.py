"""Admission: which keys may register, and how many new ones may, per client address and overall, in any
minute (a key is free to make, so many of them should at least cost time). The allowlist is the settings'
``allowlist`` and the keys of ``[admission] allowlist_file``, read again whenever the file changes; a
registration beyond a limit is refused with 429 and Retry-After. Keys registered before are not counted
again."""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict, deque
from pathlib import Path

from coordinator.errors import Forbidden, TooManyRequests
from coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)
WINDOW_S = 60.0
MAX_ADDRESSES = 4096  # addresses remembered before the quiet ones are forgotten


class Admission:
    def __init__(self, settings: CoordinatorSettings) -> None:
        a = settings.admission
        self.inline = frozenset(k.lower() for k in settings.allowlist or ())
        self.listed = a.mode == "allowlist" or settings.allowlist is not None
        self.file = a.allowlist_file
        self.per_address, self.per_minute = a.per_address_per_minute, a.per_minute
        self._file_keys: frozenset[str] = frozenset()
        self._file_stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()  # the times of new registrations in the window
        self._by_address: defaultdict[str, deque[float]] = defaultdict(deque)

    def check_key(self, miner: str) -> None:
        """Refuse a key the allowlist does not hold (when there is one)."""
        if self.listed and miner not in self.allowed():
            raise Forbidden("not_allowed", "this coordinator only takes miners on its allowlist")

    def allowed(self) -> frozenset[str]:
        return self.inline | self._read_file() if self.file is not None else self.inline

    def count_new(self, address: str, now: float) -> None:
        """A new key registering from ``address`` at ``now``: refused beyond either limit."""
        with self._lock:
            if len(self._by_address) > MAX_ADDRESSES:  # forget the addresses with nothing in the window
                for a in [a for a, q in self._by_address.items() if not q or q[-1] <= now - WINDOW_S]:
                    del self._by_address[a]
            recent, mine = self._recent, self._by_address[address]
            for q in (recent, mine):
                while q and q[0] <= now - WINDOW_S:
                    q.popleft()
            limits = ((mine, self.per_address, "from one address"), (recent, self.per_minute, "in all"))
            for q, limit, where in limits:
                if len(q) >= limit:
                    wait = max(1, math.ceil(q[0] + WINDOW_S - now))
                    raise TooManyRequests(
                        "too_many_registrations",
                        f"at most {limit} new registrations a minute {where}; retry in {wait} s",
                        headers={"Retry-After": str(wait)},
                    )
            recent.append(now)
            mine.append(now)

    def _read_file(self) -> frozenset[str]:
        if self.file is None:
            return frozenset()
        try:
            st = self.file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._file_stamp:
                self._file_keys, self._file_stamp = read_keys(self.file), stamp
                log.info("allowlist %s: %d keys", self.file, len(self._file_keys))
        except OSError as e:  # keep the keys last read: a file being replaced is no reason to lock miners out
            log.warning(
                "allowlist %s cannot be read (%s); keeping the %d keys read before",
                self.file,
                e,
                len(self._file_keys),
            )
        return self._file_keys


def read_keys(path: Path) -> frozenset[str]:
    """The public keys of an allowlist file: one a line, ``#`` starting a comment."""
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split("#", 1)[0].strip().lower()
        if key:
            keys.add(key)
    return frozenset(keys)
