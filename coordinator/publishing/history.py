"""The coordinator's side of the signed history (protocol/history.py): its key, the records it appends as the
model changes, and the signatures of its answers (``/v1/info``, ``/v1/round``, ``/v1/data``).

A record is made (and signed) just before the transaction that commits the change it records, and written
in that transaction; only the closer (or, with the service stopped, a rollback) appends, so the next record's
place and link are those of the store's newest record.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.storage.base import Store
from coordinator.storage.records import NewVersion, StoredVersion
from protocol.errors import HistoryError
from protocol.history import SignedRecord, VersionRecord, data_fields, sign, sign_record, verify
from protocol.signing import generate_key, load_key, public_key_hex, save_key
from protocol.wire import RoundInfo, RoundRecord, RunInfo

log = logging.getLogger(__name__)


def coordinator_key(path: Path, store: Store) -> Ed25519PrivateKey:
    """The key at ``path``: made there when the run has no signed history yet, else it must be the key that
    signed it (raises ValueError with a message for a person, or OSError for a file that cannot be read)."""
    last = store.last_record()
    if not path.exists():
        if last is not None:
            raise ValueError(
                f"no coordinator key at {path}, and this run's history is signed: give the key that signed "
                "it ([identity] key, or --key)"
            )
        key = generate_key()
        save_key(key, path)
        log.info("made the coordinator's key %s in %s", public_key_hex(key), path)
        return key
    key = load_key(path)
    if last is not None:
        try:
            verify(public_key_hex(key), "record", last.record.model_dump(mode="json"), last.signature)
        except HistoryError:
            raise ValueError(
                f"the key {path} did not sign this run's history: give the key that did ([identity] key, "
                "or --key)"
            ) from None
    return key


class History:
    def __init__(self, key: Ed25519PrivateKey, run_id: str, store: Store) -> None:
        self.key, self.run_id, self.store = key, run_id, store
        self.public_key = public_key_hex(key)
        self._round: tuple[tuple[object, ...], str] | None = None  # the last round answer signed

    # -- records ------------------------------------------------------------------------------------------
    def first(self, param_hash: str, checkpoint_sha: str, at: float) -> SignedRecord:
        """Version 0's record: the chain's first."""
        return self._link(
            None, kind="version", version=0, param_hash=param_hash, checkpoint_sha256=checkpoint_sha, at=at
        )

    def version(self, v: NewVersion, round_: int, at: float) -> SignedRecord:
        return self._link(self.store.last_record(), **_version_fields(v, round_), at=at)

    def rollback(self, to_version: int, param_hash: str, rolled_back: list[int], at: float) -> SignedRecord:
        return self._rollback_after(self.store.last_record(), to_version, param_hash, rolled_back, at)

    def _rollback_after(
        self, last: SignedRecord | None, to_version: int, param_hash: str, rolled_back: list[int], at: float
    ) -> SignedRecord:
        fields = {"version": to_version, "param_hash": param_hash, "rolled_back": rolled_back, "at": at}
        return self._link(last, kind="rollback", **fields)

    def _link(self, last: SignedRecord | None, **fields: object) -> SignedRecord:
        """The record after ``last`` (None: the first), signed."""
        seq, previous = (0, None) if last is None else (last.record.seq + 1, last.digest)
        record = VersionRecord.model_validate(
            {"seq": seq, "run_id": self.run_id, "previous": previous, **fields}
        )
        return sign_record(self.key, record)

    def backfill(self) -> int:
        """A state directory from before the history was kept: its versions' records, signed now, in the
        order they were made, with a rollback record before the first version made after a rollback.
        Returns how many records were added (0 when the history is already kept)."""
        store = self.store
        if store.last_record() is not None or store.latest_version() < 0:
            return 0
        made: list[SignedRecord] = []
        live: list[int] = []  # the versions on the current line, in order
        for number in range(store.latest_version() + 1):
            v = store.version(number)
            if v is None:
                continue
            if not made:
                made.append(self.first(v.param_hash, str(v.checkpoint_sha), v.created_at))
                live = [0]
                continue
            on = live[-1] if v.base_version is None else v.base_version  # (not kept by the first releases)
            if on != live[-1]:
                base = store.version(on)
                assert base is not None, "a version's base exists"
                set_aside = [n for n in live if n > on]
                made.append(self._rollback_after(made[-1], on, base.param_hash, set_aside, v.created_at))
                live = [n for n in live if n <= on]
            fields = _version_fields(dataclasses.replace(v, base_version=on), v.round)
            made.append(self._link(made[-1], **fields, at=v.created_at))
            live.append(v.version)
        head, _ = store.head()
        if head != live[-1]:  # rolled back, and nothing made since
            row = store.version(head)
            assert row is not None, "the head exists"
            later = [n for n in live if n > head]
            aside = store.version(later[0]) if later else None
            at = aside.rolled_back_at if aside is not None else None
            made.append(self._rollback_after(made[-1], head, row.param_hash, later, at or row.created_at))
        store.add_records(made)
        log.info("signed the history of the %d versions made before it was kept", len(live))
        return len(made)

    # -- answers ------------------------------------------------------------------------------------------
    def signed_info(self, info: RunInfo) -> RunInfo:
        info = info.model_copy(update={"coordinator_key": self.public_key, "signature": None})
        return info.model_copy(update={"signature": sign(self.key, "info", info.signed_fields())})

    def signed_round(self, ri: RoundInfo) -> RoundInfo:
        """``ri`` with its signature (one signature per round state, however often it is asked for)."""
        fields = ri.signed_fields(self.run_id)
        key = tuple(fields.values())
        cached = self._round
        if cached is None or cached[0] != key:
            cached = self._round = (key, sign(self.key, "round", fields))
        return ri.model_copy(update={"signature": cached[1]})

    def signed_uploads(self, record: RoundRecord) -> RoundRecord:
        return record.model_copy(
            update={"signature": sign(self.key, "uploads", record.signed_fields(self.run_id))}
        )

    def data_signature(self, ids: list[int], body: bytes) -> str:
        return sign(self.key, "data", data_fields(self.run_id, ids, body))


def _version_fields(v: NewVersion | StoredVersion, round_: int | None) -> dict[str, object]:
    return {
        "kind": "version",
        "version": v.version,
        "round": round_,
        "base_version": v.base_version,
        "param_hash": v.param_hash,
        "update_sha256": v.update_sha,
        "checkpoint_sha256": v.checkpoint_sha,
    }
