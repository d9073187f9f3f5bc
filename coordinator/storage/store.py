"""Durable state in a SQL database, SQLite (WAL, the embedded default) or PostgreSQL (``[store] url``):
rounds, miners, submissions, verdicts, versions, nonces. The only module with SQL in it but its mixins (the
reads of reports, scores and versions); blobs (payloads, updates, checkpoints) live in blobs.py.

The event loop's worker threads, the intake threads and the closer share the store, serialised by a lock;
every method is one transaction on a connection of the engine (coordinator/storage/sql.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, RowMapping
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from coordinator.storage.base import RoundClosedAlready
from coordinator.storage.checked import CheckedStore
from coordinator.storage.identities import IdentityStore
from coordinator.storage.lease import LeaseStore
from coordinator.storage.records import (
    HEALTH_FIELDS,
    Health,
    NewSubmission,
    RoundClose,
    StoredRound,
    Upload,
    kept_of,
    sketch_of,
)
from coordinator.storage.reports import ReportReads
from coordinator.storage.rows import from_row
from coordinator.storage.schema import prepare
from coordinator.storage.scores import COORDINATOR, INSERT_VERDICT, ScoreReads, verdict_rows
from coordinator.storage.sql import Tx, embedded, make_engine, redacted, store_url
from coordinator.storage.tasks import TaskStore
from coordinator.storage.versions import INSERT_RECORD, VersionStore, record_row
from protocol.history import SignedRecord

log = logging.getLogger(__name__)
STARTING_PATIENCE_S = 30.0  # how long a replica that starts tries a database it cannot reach


class StoreUnavailable(ConnectionError):
    """The store's database cannot be reached or opened (an OSError: the command line says it in a line)."""


class SqlStore(IdentityStore, ReportReads, ScoreReads, VersionStore, LeaseStore, TaskStore, CheckedStore):
    """All the SQL of a run (meta, nonces and miners in ``coordinator/storage/identities.py``, the reads of
    closed rounds in ``reports.py``, the leaderboard's in ``scores.py``, the versions and their signed
    history in ``versions.py``, the commits that replicas checked in ``checked.py``)."""

    def __init__(self, url: str) -> None:
        self.url = redacted(url)
        self._engine = make_engine(url)
        try:
            prepare(self._engine, self.url)
        except SQLAlchemyError as e:  # unreachable, refused, no such database, ...
            self._engine.dispose()
            first = str(e.orig if isinstance(e, DBAPIError) else e).strip().splitlines()[0]
            raise StoreUnavailable(f"cannot open the store at {self.url}: {first}") from None
        sqlite = self._engine.dialect.name == "sqlite"
        # PostgreSQL: the reads of ``reading`` see one snapshot. SQLite: the lock below already keeps every
        # write out while they run, and its one connection is held for the store's life (a checkout from
        # the engine per statement costs more than the statement).
        self._snapshot = None if sqlite else "REPEATABLE READ"
        self._held: Connection | None = self._engine.connect() if sqlite else None
        self._for_share = "" if sqlite else " FOR SHARE"  # the lease row, held until a fenced write commits
        self._fence: tuple[str, int] | None = None
        # SQLite: one thread at a time on the one connection. PostgreSQL: each thread on a connection of the
        # pool, so that one thread's statements do not wait on another's round trips.
        self._lock: threading.RLock | contextlib.nullcontext[None] = (
            threading.RLock() if sqlite else contextlib.nullcontext()
        )
        self._local = threading.local()  # ``current``: this thread's transaction, which nested calls join
        self._nonce_writes = 0

    def close(self) -> None:
        with self._lock:
            if self._held is not None:
                self._held.close()
                self._held = None
            self._engine.dispose()

    def fence(self, holder: str, token: int) -> None:
        """From now on every write checks that ``holder`` still holds the leader lease with ``token``
        (coordinator/storage/lease.py), and raises Deposed, writing nothing, if not."""
        self._fence = (holder, token)

    @contextmanager
    def _connection(self, isolation: str | None = None, write: bool = False) -> Iterator[Connection]:
        """A transaction on a connection of the engine (sql.py), or the one this thread is already in."""
        with self._lock:
            current: Connection | None = getattr(self._local, "current", None)
            if current is not None:
                yield current
                return
            with ExitStack() as stack:
                c = self._held or stack.enter_context(self._engine.connect())
                if isolation is not None:
                    c = c.execution_options(isolation_level=isolation)
                with c.begin():
                    self._local.current = c
                    try:
                        if write and self._fence is not None:
                            self.check_fence(Tx(c), self._fence)
                        yield c
                    finally:
                        self._local.current = None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Statements that commit together or not at all."""
        with self._connection(write=True) as c:
            yield Tx(c)

    @contextmanager
    def unfenced(self) -> Iterator[Tx]:
        """A transaction whatever the leader lease says (the lease's own statements)."""
        with self._connection() as c:
            yield Tx(c)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Reads that see one state of the database (no write lands between them)."""
        with self._connection(self._snapshot):
            yield

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        with self._connection() as c:
            return Tx(c).all(sql, args)

    def _one(self, sql: str, *args: Any) -> RowMapping | None:
        with self._connection() as c:
            return Tx(c).one(sql, args)

    def _execute(self, sql: str, *args: Any) -> None:
        with self._connection(write=True) as c:
            Tx(c).execute(sql, args)

    # -- rounds and versions ------------------------------------------------------------------------------
    def start(
        self,
        param_hash: str,
        eval_loss: float,
        checkpoint_sha: str,
        checkpoint_bytes: int,
        now: float,
        record: SignedRecord,
    ) -> None:
        """Version 0, its record and round 0 of a new run."""
        with self.transaction() as db:
            db.execute(INSERT_RECORD, record_row(record))
            db.execute(
                "INSERT INTO versions (version, round, param_hash, eval_loss, checkpoint_sha, "
                "checkpoint_bytes, created_at) VALUES (0, NULL, ?, ?, ?, ?, ?)",
                (param_hash, eval_loss, checkpoint_sha, checkpoint_bytes, now),
            )
            db.execute(
                "INSERT INTO rounds (round, version, status, opened_at) VALUES (0, 0, 'open', ?)", (now,)
            )

    def latest_round(self) -> StoredRound | None:
        row = self._one("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return None if row is None else from_row(StoredRound, row)

    def unclosed_rounds(self) -> list[StoredRound]:
        """The open round, after the one still being closed when rounds overlap."""
        rows = self._all("SELECT * FROM rounds WHERE status = 'open' ORDER BY round")
        return [from_row(StoredRound, r) for r in rows]

    def open_round(self, round_: int, version: int, now: float) -> None:
        """Overlapped rounds: the next round opens as the one before it starts closing."""
        self._execute(
            "INSERT INTO rounds (round, version, status, opened_at) VALUES (?, ?, 'open', ?)",
            round_,
            version,
            now,
        )

    def round(self, round_: int) -> StoredRound | None:
        row = self._one("SELECT * FROM rounds WHERE round = ?", round_)
        return None if row is None else from_row(StoredRound, row)

    # -- submissions --------------------------------------------------------------------------------------
    def upload(self, round_: int, miner: str) -> Upload | None:
        row = self._one("SELECT * FROM submissions WHERE round = ? AND miner = ?", round_, miner)
        return None if row is None else _upload(row)

    def round_uploads(self, round_: int) -> list[Upload]:
        """A round's uploads in the order they arrived."""
        rows = self._all("SELECT * FROM submissions WHERE round = ? ORDER BY received_at", round_)
        return [_upload(r) for r in rows]

    def add_submission(self, s: NewSubmission) -> None:
        self.add_submissions([s])

    def add_submissions(self, subs: Sequence[NewSubmission]) -> None:
        """The uploads, their rounds' bytes and first arrivals, and their miners' last rounds, at once."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO submissions (round, miner, sha256, content_sha256, bytes, status, compute_s, "
                f"received_at, norm, sketch, stored_sha256, kept, {', '.join(HEALTH_FIELDS)}) "
                "VALUES (?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        *(s.round, s.miner, s.sha256, s.content_sha256, s.size, s.compute_s, s.received_at),
                        *(s.norm, s.sketch, s.stored_sha256, s.kept, *astuple(s.health)),
                    )
                    for s in subs
                ],
            )
            for round_ in sorted({s.round for s in subs}):
                of_round = [s for s in subs if s.round == round_]
                db.execute(
                    "UPDATE rounds SET bytes_up = bytes_up + ?, "
                    "first_upload_at = COALESCE(first_upload_at, ?) WHERE round = ?",
                    (sum(s.size for s in of_round), min(s.received_at for s in of_round), round_),
                )
            db.executemany(
                "UPDATE miners SET last_seen_round = ? WHERE pubkey = ?", [(s.round, s.miner) for s in subs]
            )

    def record_refusal(self, round_: int, miner: str, code: str, at: float) -> None:
        self._execute(
            "INSERT INTO refusals (round, miner, code, at) VALUES (?, ?, ?, ?)", round_, miner, code, at
        )

    # -- closing a round ----------------------------------------------------------------------------------
    def close_round(self, c: RoundClose) -> None:
        """The new version (if any), the verdicts, every upload's outcome, the round's record and the next
        round (synchronous rounds), in one transaction: a crash before it leaves the round open, after it the
        round closed. A round closed already is refused (``RoundClosedAlready``), with nothing
        changed."""
        with self.transaction() as db:
            accepted = sum(o.reason is None for o in c.outcomes.values())
            closed = db.count(
                "UPDATE rounds SET status = 'closed', closed_at = ?, accepted = ?, rejected = ?, "
                "compute_s = ?, eval_loss = ?, close_reason = ?, reference_norm = ?, "
                "bytes_down = bytes_down + ?, bytes_down_model = bytes_down_model + ?, "
                "bytes_down_data = bytes_down_data + ?, result_version = ?, applied_to = ?, scored = ?, "
                f"{', '.join(f'{f} = ?' for f in HEALTH_FIELDS)} WHERE round = ? AND status = 'open'",
                (
                    c.closed_at,
                    accepted,
                    len(c.outcomes) - accepted,
                    c.compute_s,
                    None if c.version is None else c.version.eval_loss,
                    c.close_reason,
                    c.reference_norm,
                    sum(c.bytes_down),
                    *c.bytes_down,
                    c.next_version,
                    c.applied_to,
                    int(c.scored),
                    *astuple(c.health),
                    c.round,
                ),
            )
            if closed != 1:  # closed already: an earlier commit landed although its answer was lost
                raise RoundClosedAlready(f"round {c.round} is closed already; nothing was changed")
            if (v := c.version) is not None:
                assert c.record is not None, "a version is committed with its signed record"
                db.execute(INSERT_RECORD, record_row(c.record))
                db.execute(
                    "INSERT INTO versions (version, round, param_hash, eval_loss, update_sha, update_bytes, "
                    "checkpoint_sha, checkpoint_bytes, created_at, base_version, state_sha) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        v.version,
                        c.round,
                        v.param_hash,
                        v.eval_loss,
                        v.update_sha,
                        v.update_bytes,
                        v.checkpoint_sha,
                        v.checkpoint_bytes,
                        c.closed_at,
                        v.base_version,
                        v.state_sha,
                    ),
                )
            db.executemany(INSERT_VERDICT, verdict_rows(c.round, COORDINATOR, c.verdicts, c.closed_at))
            db.executemany(
                "UPDATE submissions SET status = ?, reason = ?, evaluated = ?, scale = ? "
                "WHERE round = ? AND miner = ?",
                [
                    (
                        "accepted" if o.reason is None else "rejected",
                        o.reason,
                        int(o.evaluated),
                        o.scale,
                        c.round,
                        miner,
                    )
                    for miner, o in c.outcomes.items()
                ],
            )
            if c.open_next:
                db.execute(
                    "INSERT INTO rounds (round, version, status, opened_at) VALUES (?, ?, 'open', ?)",
                    (c.round + 1, c.next_version, c.closed_at),
                )

    def add_bytes_down(self, round_: int, model: int, data: int) -> None:
        self._execute(
            "UPDATE rounds SET bytes_down = bytes_down + ?, bytes_down_model = bytes_down_model "
            "+ ?, bytes_down_data = bytes_down_data + ? WHERE round = ?",
            model + data,
            model,
            data,
            round_,
        )

    def uploaded_miners(self, round_: int) -> set[str]:
        return {r["miner"] for r in self._all("SELECT miner FROM submissions WHERE round = ?", round_)}


def open_store(state_dir: Path, url: str | None = None, patience_s: float = 0.0) -> SqlStore:
    """The store of a state directory: ``url`` (``[store] url``) when set, else its SQLite file.
    ``patience_s``: how long to try again a PostgreSQL that cannot be reached (it may be restarting; a
    SQLite file is not tried again)."""
    deadline = time.monotonic() + (0.0 if embedded(url) else patience_s)
    while True:
        try:
            return SqlStore(store_url(state_dir, url))
        except StoreUnavailable as e:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s; trying again for %.0f s more", e, deadline - time.monotonic())
            time.sleep(1.0)


def _upload(row: RowMapping) -> Upload:
    return Upload(
        miner=row["miner"],
        sha256=row["sha256"],
        content_sha256=row["content_sha256"],
        norm=row["norm"],
        sketch=sketch_of(row["sketch"]),
        stored_sha256=row["stored_sha256"],
        round=row["round"],
        size=row["bytes"],
        compute_s=row["compute_s"],
        status=row["status"],
        reason=row["reason"],
        evaluated=bool(row["evaluated"]),
        scale=row["scale"],
        flag=row["flag"],
        health=Health(*(row[f] for f in HEALTH_FIELDS)),
        kept=kept_of(row["kept"]),
    )
