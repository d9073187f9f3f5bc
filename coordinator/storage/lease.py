"""The leader lease in the store: which coordinator process may change the run, and the fencing token
each of its commits is checked against, so that a leader that lost the lease (it stalled, the network
parted it from the database) and wakes up commits nothing.

A process takes the lease when it is free, expired or its own, and renews it well before it expires; a
taken lease carries a token one higher than any before. The store, once fenced with (holder, token),
checks in every write transaction that the lease still holds them, holding the row against a new taker
until the write commits (PostgreSQL: ``FOR SHARE``; SQLite has one writer at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

from coordinator.storage.sql import Tx

log = logging.getLogger(__name__)
TAKE = (
    "UPDATE lease SET holder = ?, token = token + 1, expires_at = ? WHERE name = 'leader' "
    "AND (holder = ? OR expires_at < ?)"
)


class Deposed(RuntimeError):
    """This process no longer holds the leader lease: it must not change the run."""


@dataclass(frozen=True)
class LeaseHolder:
    holder: str
    token: int
    expires_at: float


class LeaseStore:
    """Mixed into ``SqlStore``, which gives ``unfenced`` and ``_for_share``. The lease's own statements
    are not fenced: they are what the fence is made of."""

    def unfenced(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    _for_share: str

    def take_lease(self, holder: str, now: float, lease_s: float, force: bool = False) -> int | None:
        """The lease for ``holder`` if it is free, expired or its own (or ``force``: whoever holds it; the
        embedded store, whose file lock already makes this process the only one): its new token, else
        None."""
        with self.unfenced() as db:
            taken = db.count(TAKE, (holder, now + lease_s, holder, float("inf") if force else now))
            if not taken:
                return None
            row = db.one("SELECT token FROM lease WHERE name = 'leader'")
            assert row is not None
            return int(row["token"])

    def renew_lease(self, holder: str, token: int, now: float, lease_s: float) -> bool:
        """Push the lease's end further; False if ``holder`` no longer holds it with ``token``."""
        with self.unfenced() as db:
            return bool(
                db.count(
                    "UPDATE lease SET expires_at = ? WHERE name = 'leader' AND holder = ? AND token = ?",
                    (now + lease_s, holder, token),
                )
            )

    def release_lease(self, holder: str, token: int) -> None:
        """Let the lease go at once (a clean stop), so that a standby takes it without waiting it out."""
        with self.unfenced() as db:
            db.execute(
                "UPDATE lease SET expires_at = 0 WHERE name = 'leader' AND holder = ? AND token = ?",
                (holder, token),
            )

    def fence(self, holder: str, token: int) -> None:
        raise NotImplementedError

    def lease_holder(self) -> LeaseHolder:
        with self.unfenced() as db:
            row = db.one("SELECT holder, token, expires_at FROM lease WHERE name = 'leader'")
        assert row is not None
        return LeaseHolder(str(row["holder"]), int(row["token"]), float(row["expires_at"]))

    def check_fence(self, db: Tx, fence: tuple[str, int]) -> None:
        row = db.one("SELECT holder, token FROM lease WHERE name = 'leader'" + self._for_share)
        if row is None or (str(row["holder"]), int(row["token"])) != fence:
            now = "nobody" if row is None or not row["holder"] else f"{row['holder']} (token {row['token']})"
            raise Deposed(f"the leader lease is held by {now}, not by this process (token {fence[1]})")


def holder_name(name: str | None) -> str:
    """This process in the lease, the logs and the answers' headers: ``[cluster] name``, else host:pid."""
    return name or f"{socket.gethostname()}:{os.getpid()}"


class LeaderLease:
    """This process's hold on the leader lease: taken at start (standing by while another process holds
    it), renewed from then on every third of ``lease_s`` by a thread, let go at a clean stop. Once it is
    lost (another took it, or it could not be renewed for ``lease_s``), ``lost`` is set with why, and the
    store, fenced, refuses every write."""

    def __init__(self, store: LeaseStore, holder: str, lease_s: float, force: bool = False) -> None:
        """``force``: take it whoever holds it (the embedded store: the state directory's lock already
        makes this process the only one)."""
        self.store, self.holder, self.lease_s, self.force = store, holder, lease_s, force
        self.token: int | None = None
        self.lost = threading.Event()
        self.why = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> int:
        """Take the lease, waiting as long as another holds it, and renew it from then on (whatever the
        process does next may take longer than the lease); returns the fencing token."""
        announced = False
        while True:
            try:
                token = self.store.take_lease(self.holder, time.time(), self.lease_s, self.force)
                if token is not None:
                    break
                if not announced:
                    held = self.store.lease_holder()
                    log.info(
                        "standing by: %s holds the leader lease (for %.1f s more unless renewed)",
                        held.holder,
                        held.expires_at - time.time(),
                    )
                    announced = True
            except Exception as e:  # the database is unreachable for now: stand by until it is back
                log.warning("cannot reach the store for the leader lease: %s: %s", type(e).__name__, e)
            time.sleep(self.lease_s / 4)
        if announced:
            log.info("took the leader lease (token %d)", token)
        self.token = token
        if not self.force:  # the embedded store: the state directory's lock already keeps the others out
            self.store.fence(self.holder, token)
        self._thread = threading.Thread(target=self._keep, name="lease", daemon=True)
        self._thread.start()
        return token

    def _keep(self) -> None:
        assert self.token is not None
        renewed = time.time()
        while not self._stop.wait(self.lease_s / 3):
            try:
                if self.store.renew_lease(self.holder, self.token, time.time(), self.lease_s):
                    renewed = time.time()
                    continue
                self._lose("another process took the leader lease")
                return
            except Deposed as e:
                self._lose(str(e))
                return
            except Exception as e:  # the database is unreachable: the lease runs out
                log.warning("cannot renew the leader lease: %s: %s", type(e).__name__, e)
                if time.time() - renewed > self.lease_s:
                    self._lose(f"could not renew the leader lease for {self.lease_s:g} s")
                    return

    def _lose(self, why: str) -> None:
        log.error("lost the leader lease: %s; this process changes nothing more", why)
        self.why = why
        self.lost.set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.token is not None and not self.lost.is_set():
            with contextlib.suppress(Exception):  # a lease not let go runs out by itself
                self.store.release_lease(self.holder, self.token)
