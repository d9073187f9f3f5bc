"""What a node trusts of the coordinator: its key, pinned, and what that key signed (protocol/history.py).

The key is pinned by ``--coordinator-key HEX``, or on first use: the key the coordinator first showed is
kept in the state directory (``coordinator.pub``) and a coordinator with another key is refused until its
operator's new key is accepted (the file deleted, or the key given). Every answer a node acts on is checked
before it is used: ``/v1/info`` and ``/v1/round`` by their signatures; each version (its parameter hash) and
each published update and checkpoint (their sha256) by the signed history, verified record by record from
the first; each data answer by its signature of the ids asked for and the body. The newest record verified
is kept in the state directory too (``coordinator-history.json``), so a history rewritten behind a node's
back is refused after a restart as well. Anything that does not verify raises ``HistoryError`` (the client
makes it ``Untrusted``: the node stops) and nothing of it is applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NoReturn

from protocol.errors import HistoryError
from protocol.history import Chain, HistoryPage, Known, data_fields, verify
from protocol.wire import RoundInfo, RoundRecord, RunInfo

log = logging.getLogger(__name__)
PIN_FILE = "coordinator.pub"
HEAD_FILE = "coordinator-history.json"
Fetch = Callable[[int], HistoryPage]  # the history's records after a seq
Refusal = Literal["key", "info", "round", "version", "history", "update", "checkpoint", "data"]


class Trust:
    def __init__(self, state_dir: Path, pinned: str | None = None) -> None:
        self.state_dir, self.pinned = state_dir, None if pinned is None else pinned.lower()
        self.on_refusal: Callable[[Refusal], None] = lambda what: None  # a metric, for one
        self.key: str | None = None
        self.run_id = ""
        self.chain: Chain | None = None
        self._lock = threading.Lock()  # the miner's main thread and its watch for the next version

    def _refuse(self, what: Refusal, message: str) -> NoReturn:
        self.on_refusal(what)
        raise HistoryError(message)

    # -- the key ------------------------------------------------------------------------------------------
    def accept_info(self, info: RunInfo) -> None:
        """Pin the coordinator's key (or check it against the pin) and check the answer's signature."""
        key = (info.coordinator_key or "").lower()
        if not key:
            self._refuse(
                "key",
                "the coordinator does not sign its answers (no coordinator_key in /v1/info): it is older "
                "than this node",
            )
        if self.pinned is not None and key != self.pinned:
            self._refuse(
                "key", f"the coordinator's key is {key}, not the pinned {self.pinned} (--coordinator-key)"
            )
        try:
            verify(key, "info", info.signed_fields(), info.signature)
        except HistoryError as e:
            self._refuse("info", str(e))
        if self.pinned is None:
            self._pin_on_first_use(key)
        with self._lock:
            if self.key != key or self.run_id != info.run_id:
                self.key, self.run_id, self.chain = key, info.run_id, Chain(key, info.run_id)
                self.chain.expect = self._verified_before()

    def _pin_on_first_use(self, key: str) -> None:
        path = self.state_dir / PIN_FILE
        if path.exists():
            saved = path.read_text().strip().lower()
            if saved != key:
                self._refuse(
                    "key",
                    f"the coordinator's key changed from {saved} (pinned on first use in {path}) to {key}; "
                    f"if its operator changed it, delete {path} or pass --coordinator-key {key}",
                )
            return
        _write(path, key + "\n")
        log.warning("pinned the coordinator's key %s on first use (%s)", key, path)

    # -- answers ------------------------------------------------------------------------------------------
    def check_round(self, ri: RoundInfo, fetch: Fetch) -> None:
        try:
            verify(self._key(), "round", ri.signed_fields(self.run_id), ri.signature)
        except HistoryError as e:
            self._refuse("round", str(e))
        self.check_version(ri.version, ri.param_hash, fetch)
        if ri.newest is not None and ri.newest_hash is not None:
            self.check_version(ri.newest, ri.newest_hash, fetch)

    def check_version(self, version: int, param_hash: str, fetch: Fetch) -> None:
        known = self.known(version, fetch)
        if known.param_hash != param_hash:
            self._refuse(
                "version",
                f"the coordinator names parameter hash {param_hash[:16]} for version {version}; its signed "
                f"record says {known.param_hash[:16]}",
            )

    def check_blob(
        self, what: Literal["update", "checkpoint"], version: int, data: bytes, fetch: Fetch
    ) -> None:
        self.check_sha256(what, version, hashlib.sha256(data).hexdigest(), fetch)

    def check_sha256(
        self, what: Literal["update", "checkpoint"], version: int, got: str, fetch: Fetch
    ) -> None:
        """The sha256 of a downloaded update or checkpoint (a file hashed as it lies on disk) against the
        version's signed record."""
        known = self.known(version, fetch)
        signed = known.update_sha256 if what == "update" else known.checkpoint_sha256
        if got != signed:
            self._refuse(
                what,
                f"the {what} of version {version} does not match its signed record (sha256 {got[:16]}, "
                f"signed {(signed or 'none')[:16]})",
            )

    def check_uploads(self, record: RoundRecord) -> None:
        """A round's record of its uploads (what a validator evaluates, and their sha256)."""
        try:
            verify(self._key(), "uploads", record.signed_fields(self.run_id), record.signature)
        except HistoryError as e:
            self._refuse("round", str(e))

    def check_data(self, ids: list[int], body: bytes, signature: str | None) -> None:
        try:
            verify(self._key(), "data", data_fields(self.run_id, ids, body), signature)
        except HistoryError as e:
            self._refuse("data", f"{e} ({len(ids)} sequences)")

    # -- the history --------------------------------------------------------------------------------------
    def known(self, version: int, fetch: Fetch) -> Known:
        """What the signed history says of ``version``, reading the records not verified yet."""
        with self._lock:
            chain = self._chain()
            if (known := chain.known(version)) is None:
                self._extend(chain, fetch)
                known = chain.known(version)
        if known is None:
            self._refuse("version", f"version {version} is not in the coordinator's signed history")
        return known

    def _extend(self, chain: Chain, fetch: Fetch) -> None:
        while True:
            page = fetch(chain.seq)
            try:
                chain.extend(page.records)
            except HistoryError as e:
                self._refuse("history", f"the coordinator's history does not verify: {e}")
            if not page.records or chain.seq >= page.last:
                break
        newest = max(chain.expect, default=-1)
        if chain.seq < newest:
            self._refuse(
                "history",
                f"the coordinator's history ends at record {chain.seq}, before record {newest} that this "
                f"node verified earlier: it was rewritten (if its operator restored it from a backup, delete "
                f"{self.state_dir / HEAD_FILE})",
            )
        if chain.digest is not None:
            _write(self.state_dir / HEAD_FILE, json.dumps(self._head(chain)))

    def _head(self, chain: Chain) -> dict[str, object]:
        return {"key": chain.key, "run_id": chain.run_id, "seq": chain.seq, "digest": chain.digest}

    def _verified_before(self) -> dict[int, str]:
        """The newest record verified before (by seq), when it was this coordinator's and this run's."""
        try:
            saved = json.loads((self.state_dir / HEAD_FILE).read_text())
            if saved["key"] == self.key and saved["run_id"] == self.run_id:
                return {int(saved["seq"]): str(saved["digest"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return {}

    def _key(self) -> str:
        assert self.key is not None, "the run's info is read (and the key pinned) first"
        return self.key

    def _chain(self) -> Chain:
        assert self.chain is not None, "the run's info is read (and the key pinned) first"
        return self.chain


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
