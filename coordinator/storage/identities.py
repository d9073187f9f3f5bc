"""The store's meta rows, nonces and miners: what identifies a run and its signers."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import RowMapping

from coordinator.storage.sql import Tx


class IdentityStore:
    """Mixed into ``SqlStore``, which gives ``_one``, ``_all``, ``_execute``, ``transaction`` and
    ``unfenced``."""

    _nonce_writes: int

    def _one(self, sql: str, *args: Any) -> RowMapping | None:
        raise NotImplementedError

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        raise NotImplementedError

    def _execute(self, sql: str, *args: Any) -> None:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def unfenced(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    # -- meta and nonces ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", key)
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    def remember_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Record a nonce; False if it is already recorded and not yet expired. Not fenced by the leader
        lease: a nonce is no part of the run's state, only a guard against replays, whoever records it."""
        return nonce in self.remember_nonces([nonce], expires_at, now)

    def remember_nonces(self, nonces: Sequence[str], expires_at: float, now: float) -> set[str]:
        """Record several nonces in one statement: those recorded now (``remember_nonce`` each, a nonce
        given twice recorded once). In order, so that two such statements at once lock their rows in the
        same order."""
        distinct = sorted(set(nonces))
        if not distinct:
            return set()
        with self.unfenced() as db:
            # a new nonce is inserted, an expired one renewed, a live one left (no row returned)
            rows = db.all(
                f"INSERT INTO nonces (nonce, expires_at) VALUES {', '.join(['(?, ?)'] * len(distinct))} "
                "ON CONFLICT(nonce) DO UPDATE SET expires_at = excluded.expires_at "
                "WHERE nonces.expires_at <= ? RETURNING nonce",
                (*(v for n in distinct for v in (n, expires_at)), now),
            )
            before, self._nonce_writes = self._nonce_writes, self._nonce_writes + len(rows)
            if before // 1000 != self._nonce_writes // 1000:  # now and then, forget the expired ones
                db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
        return {str(r["nonce"]) for r in rows}

    # -- miners -------------------------------------------------------------------------------------------
    def is_miner(self, pubkey: str) -> bool:
        return pubkey in self.miners_among([pubkey])

    def miners_among(self, pubkeys: Sequence[str]) -> set[str]:
        """Those of ``pubkeys`` that are registered, in one statement."""
        keys = list(dict.fromkeys(pubkeys))
        if not keys:
            return set()
        rows = self._all(f"SELECT pubkey FROM miners WHERE pubkey IN ({', '.join('?' * len(keys))})", *keys)
        return {str(r["pubkey"]) for r in rows}

    def register(self, pubkey: str, round_: int, now: float) -> bool:
        """Record the miner as seen in ``round_``; True if it is new."""
        with self.transaction() as db:
            known = db.one("SELECT 1 FROM miners WHERE pubkey = ?", (pubkey,)) is not None
            db.execute(
                "INSERT INTO miners (pubkey, registered_at, last_seen_round) VALUES (?, ?, ?) "
                "ON CONFLICT(pubkey) DO UPDATE SET last_seen_round = excluded.last_seen_round",
                (pubkey, now, round_),
            )
        return not known

    def count_miners(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM miners")
        return int(row["n"]) if row else 0

    def active_miners(self, since_round: int) -> list[str]:
        return [
            r["pubkey"]
            for r in self._all("SELECT pubkey FROM miners WHERE last_seen_round >= ?", since_round)
        ]
