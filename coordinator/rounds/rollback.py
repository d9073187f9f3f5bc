"""The operator's way back: ``gradpool coordinator rollback --state-dir DIR --to-version V``, with the
service stopped, makes version V current again.

Nothing is deleted: the later versions are marked rolled back (``/v1/versions/{v}`` still shows them, and
their rounds and verdicts stay in the audit trail), the open rounds close with the reason ``rolled_back``
(their uploads trained on a version that is no longer current; they are not held against their miners), and
a new round opens for V. New versions are numbered after every earlier one, so a version number always
means one model. Miners see the round's version go back and resynchronise by checkpoint. The rollback is a
record of the signed history (protocol/history.py), signed with the coordinator's key, so it takes that key
(``--key``, when it is not the state directory's ``coordinator.pem``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.publishing.history import History, coordinator_key
from coordinator.storage.lock import StateLock
from coordinator.storage.records import Refusal
from coordinator.storage.sql import SQLITE_FILE
from coordinator.storage.store import SqlStore, open_store


@dataclass(frozen=True)
class RolledBack:
    version: int
    set_aside: list[int]
    closed_round: int


def rollback(
    state_dir: Path, to_version: int, key: Path | None = None, store_url: str | None = None
) -> RolledBack:
    """Raises ValueError with a message for a person when it cannot be done (and changes nothing then).
    ``store_url``: the store, when it is not the state directory's SQLite file ([store] url)."""
    if store_url is None and not (state_dir / SQLITE_FILE).is_file():
        raise ValueError(f"{state_dir} holds no coordinator state (no {SQLITE_FILE})")
    lock = StateLock(state_dir)  # refuses while a coordinator runs on this directory
    try:
        store = open_store(state_dir, store_url)
    except BaseException:
        lock.release()
        raise
    try:
        row = store.version(to_version)
        if row is None:
            raise ValueError(f"version {to_version} does not exist")
        if row.rolled_back_at is not None:
            raise ValueError(f"version {to_version} was itself rolled back")
        if row.checkpoint_sha is None:
            kept = [v for v in range(store.latest_version() + 1) if store.checkpoint(v) is not None]
            raise ValueError(f"version {to_version} has no checkpoint kept; versions with one: {kept}")
        if store.head()[0] == to_version:
            raise ValueError(f"version {to_version} is already the current version")
        history = History(coordinator_key(key or state_dir / "coordinator.pem", store), _run_id(store), store)
        history.backfill()
        now = time.time()
        record = history.rollback(to_version, row.param_hash, store.live_after(to_version), now)
        later, closed = store.rollback(to_version, now, Refusal.ROLLED_BACK, record)
        return RolledBack(to_version, later, closed)
    finally:
        store.close()
        lock.release()


def _run_id(store: SqlStore) -> str:
    last = store.last_record()
    if last is not None:
        return last.record.run_id
    return str(json.loads(store.get_meta("fingerprint") or "{}").get("run", {}).get("run_id", "gradpool"))
