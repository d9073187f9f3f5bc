"""``gradpool audit``: anyone's check that a run's published history is what the rules produced.

It walks the coordinator's signed history (protocol/history.py) from the first record: every signature
against the coordinator's key, every link to the record before, every rule a history keeps (versions
numbered upwards, each update applied to the current version, rollbacks to an earlier live version). It
replays the model as it goes: version 0 from its checkpoint, then every published update in turn (again
from version 0 along the line a rollback returns to), checking each update's and each kept checkpoint's
sha256 against its record and each version's parameter hash against what the replay gives. Read from a
running coordinator (``--coordinator URL``, nothing but its public endpoints) or from a state directory
(``--state-dir``, whose versions table is checked against the signed records too). It stops at the first
thing that fails and names it; the exit code is 0 only when the whole history verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from coordinator.settings import BlobSettings
from coordinator.storage.records import StoredVersion
from protocol.errors import CodecError, HistoryError
from protocol.history import Chain, Known, SignedRecord, VersionRecord, verify
from protocol.model import ModelConfig
from protocol.params import Params, apply_update, decode_update, load_checkpoint, model_spec, params_hash
from protocol.payload import ParamSpec

T = TypeVar("T")


class Source(Protocol):
    """Where the history and its blobs are read from."""

    key: str  # the coordinator's public key, as the source gives it
    architecture: ModelConfig

    def records(self) -> Iterator[SignedRecord]: ...

    def update(self, version: int) -> bytes: ...

    def checkpoint(self, version: int) -> bytes | None:
        """The version's checkpoint if it is still kept (None: pruned)."""
        ...

    def stored(self, record: VersionRecord) -> str | None:
        """What the source's own tables say against the record, if anything (None: they agree)."""
        ...

    def head(self) -> int | None:
        """The current version the source serves (None: it cannot say)."""
        ...

    def close(self) -> None: ...


@dataclass
class Audit:
    ok: bool = True
    key: str = ""
    run_id: str = ""
    records: int = 0
    versions: int = 0
    rollbacks: int = 0
    checkpoints: int = 0  # kept checkpoints checked
    head: int | None = None
    failure: dict[str, object] = field(default_factory=dict)  # seq, version, reason

    def fail(self, record: VersionRecord | None, reason: str) -> Audit:
        self.ok = False
        self.failure = {
            "seq": None if record is None else record.seq,
            "version": None if record is None else record.version,
            "reason": reason,
        }
        return self


def audit(source: Source, pinned: str | None = None) -> Audit:
    """Walk and replay the whole history; the result says where it first fails, if anywhere."""
    out = Audit(key=source.key)
    if pinned is not None and pinned.lower() != source.key.lower():
        return out.fail(None, f"the coordinator's key is {source.key}, not the pinned {pinned.lower()}")
    spec = model_spec(source.architecture)
    chain = Chain(source.key)
    replay = _Replay(source, spec, chain)
    record: VersionRecord | None = None
    try:
        for signed in source.records():
            record = signed.record
            chain.extend([signed])
            if (problem := source.stored(record)) is not None:
                return out.fail(record, problem)
            replay.step(record)
            out.records += 1
            out.versions += record.kind == "version"
            out.rollbacks += record.kind == "rollback"
    except (HistoryError, _Failed, SourceError) as e:
        where = "" if record is None else f"record {record.seq} (version {record.version}): "
        return out.fail(record, str(e).removeprefix(where))
    if out.records == 0:
        return out.fail(None, "the history has no records")
    try:
        head = source.head()
    except SourceError as e:
        return out.fail(None, str(e))
    if head is not None and head != chain.head and (head in chain.versions or head < (chain.head or 0)):
        return out.fail(None, f"the current version is {head}, the signed history's is {chain.head}")
    out.run_id, out.head, out.checkpoints = str(chain.run_id), chain.head, replay.checkpoints
    return out


class _Failed(Exception):
    pass


class _Replay:
    """The model along the history: the current version's parameters, rebuilt from version 0 after a
    rollback."""

    def __init__(self, source: Source, spec: ParamSpec, chain: Chain) -> None:
        self.source, self.spec, self.chain = source, spec, chain
        self.first: Params | None = None
        self.params: Params = {}
        self.at: int | None = None
        self.checkpoints = 0

    def step(self, r: VersionRecord) -> None:
        if r.kind == "rollback":
            self.params, self.at = self._rebuild(r.version), r.version
            return
        k = self.chain.known(r.version)
        assert k is not None, "the record was added to the chain"
        if r.seq == 0:
            data = self.source.checkpoint(0)
            if data is None:
                raise _Failed("version 0's checkpoint is not kept: nothing to replay from")
            self.first = self._checkpoint(k, data)
            self.params, self.at = {n: t.clone() for n, t in self.first.items()}, 0
            return
        self._apply(k, self.params)
        self.at = r.version
        if (data := self.source.checkpoint(r.version)) is not None:
            self._checkpoint(k, data)

    def _apply(self, k: Known, params: Params) -> None:
        try:
            data = self.source.update(k.version)
        except (OSError, ValueError, SourceError) as e:
            raise _Failed(f"the published update cannot be read ({e})") from None
        _same("the published update's sha256", hashlib.sha256(data).hexdigest(), k.update_sha256)
        try:
            header, delta = decode_update(data, self.spec)
        except CodecError as e:
            raise _Failed(f"the published update does not decode ({e.message})") from None
        if (header.base_version, header.version) != (k.base_version, k.version):
            raise _Failed(f"the update says {header.base_version} -> {header.version}")
        apply_update(params, delta)
        _same("the parameter hash the replay gives", params_hash(params, self.spec), k.param_hash)

    def _checkpoint(self, k: Known, data: bytes) -> Params:
        _same("the checkpoint's sha256", hashlib.sha256(data).hexdigest(), k.checkpoint_sha256)
        try:
            params, _ = load_checkpoint(data, self.spec)
        except CodecError as e:
            raise _Failed(f"the checkpoint does not load ({e.message})") from None
        _same("the checkpoint's parameter hash", params_hash(params, self.spec), k.param_hash)
        self.checkpoints += 1
        return params

    def _rebuild(self, version: int) -> Params:
        """Version ``version`` replayed from version 0, along the versions its updates applied to."""
        line: list[Known] = []
        v: int | None = version
        while v:
            known = self.chain.known(v)
            assert known is not None, "the chain holds every version before"
            line.append(known)
            v = known.base_version
        assert self.first is not None
        params = {n: t.clone() for n, t in self.first.items()}
        for known in reversed(line):
            self._apply(known, params)
        return params


def _same(what: str, got: str, signed: str | None) -> None:
    if got != signed:
        raise _Failed(f"{what} is {got}, its signed record says {signed}")


# -- sources --------------------------------------------------------------------------------------------
class SourceError(Exception):
    """The source cannot give what the audit needs (unreachable, missing, unreadable)."""


class RemoteSource:
    """A coordinator's public endpoints (``/v1/info``, ``/v1/history``, ``/v1/versions/...``,
    ``/v1/checkpoint``): what any miner can read."""

    def __init__(self, url: str, ca_cert: Path | None = None, timeout_s: float = 120.0) -> None:
        from node.client import CoordinatorClient
        from node.errors import ClientError
        from protocol.signing import generate_key

        self._errors: tuple[type[Exception], ...] = (ClientError,)
        self.client = CoordinatorClient(url, generate_key(), timeout_s, ca_cert=ca_cert)  # reads only
        info = self._call(self.client.info)
        if not info.coordinator_key:
            raise SourceError(f"{url} does not sign its history (no coordinator_key in /v1/info)")
        try:
            verify(info.coordinator_key, "info", info.signed_fields(), info.signature)
        except HistoryError as e:
            raise SourceError(str(e)) from None
        self.key, self.architecture = info.coordinator_key, info.architecture

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except self._errors as e:
            raise SourceError(str(e)) from None

    def records(self) -> Iterator[SignedRecord]:
        after = -1
        while True:
            page = self._call(self.client.history, after)
            yield from page.records
            if not page.records or page.records[-1].record.seq >= page.last:
                return
            after = page.records[-1].record.seq

    def update(self, version: int) -> bytes:
        return self._call(self.client.update, version)

    def head(self) -> int | None:
        """(A version published since the history was read is newer than its head: not a failure.)"""
        ri = self._call(self.client.round)
        return ri.newest if ri.newest is not None else ri.version

    def checkpoint(self, version: int) -> bytes | None:
        from node.errors import Refused

        try:
            found, data = self.client.checkpoint(version)
        except Refused as e:
            if e.status == 404:
                return None
            raise SourceError(str(e)) from None
        except self._errors as e:
            raise SourceError(str(e)) from None
        return data if found == version else None

    def stored(self, record: VersionRecord) -> str | None:
        if record.kind != "version":
            return None
        shown = self._call(self.client.version, record.version)
        if shown.param_hash != record.param_hash:
            return (
                f"/v1/versions/{record.version} names parameter hash {shown.param_hash}, its record another"
            )
        return None

    def close(self) -> None:
        self.client.close()


class StateSource:
    """A coordinator's state directory (its store and blobs), read as they are; its versions table is held
    to the signed records."""

    def __init__(self, state_dir: Path, key: str | None, blobs: BlobSettings | None = None) -> None:
        from coordinator.storage.blob_stores import make_blob_store
        from coordinator.storage.store import open_store
        from protocol.signing import load_key, public_key_hex

        if not (state_dir / "state.db").is_file():
            raise SourceError(f"{state_dir} holds no coordinator state (no state.db)")
        try:
            self.store = open_store(state_dir)
        except ValueError as e:  # a schema this code does not run on
            raise SourceError(str(e)) from None
        self.blobs = make_blob_store(blobs or BlobSettings(), state_dir / "blobs")
        architecture = self.store.get_meta("architecture")
        if architecture is None:
            raise SourceError(f"{state_dir} does not name its model (no architecture in its meta table)")
        self.architecture = ModelConfig.model_validate_json(architecture)
        if key is None:
            pem = state_dir / "coordinator.pem"
            if not pem.exists():
                raise SourceError(f"no coordinator.pem in {state_dir}: pass --coordinator-key HEX")
            key = public_key_hex(load_key(pem))
        self.key = key
        self._recorded: set[int] = set()
        self._aside: set[int] = set()

    def records(self) -> Iterator[SignedRecord]:
        after = -1
        while page := self.store.records(after, 1000):
            for signed in page:
                self._recorded.add(signed.record.version)
                self._aside |= set(signed.record.rolled_back)
                yield signed
            after = page[-1].record.seq
        unsigned = [v for v in range(self.store.latest_version() + 1) if v not in self._recorded]
        unsigned = [v for v in unsigned if self.store.version(v) is not None]
        if unsigned:
            raise SourceError(f"versions {unsigned} of the versions table have no signed record")
        marked = {v for v in self._recorded if self._row(v).rolled_back}
        if marked != self._aside:
            raise SourceError(
                f"the versions table marks {sorted(marked)} rolled back, the signed history "
                f"{sorted(self._aside)}"
            )

    def head(self) -> int | None:
        return self.store.head()[0]

    def _row(self, version: int) -> StoredVersion:
        row = self.store.version(version)
        if row is None:
            raise SourceError(f"version {version} is not in the versions table")
        return row

    def update(self, version: int) -> bytes:
        sha = self._row(version).update_sha
        if sha is None:
            raise SourceError(f"version {version} has no published update in the versions table")
        return self._blob(sha)

    def checkpoint(self, version: int) -> bytes | None:
        sha = self._row(version).checkpoint_sha
        return None if sha is None else self._blob(sha)

    def _blob(self, sha: str) -> bytes:
        try:
            return self.blobs.get(sha)
        except FileNotFoundError:
            raise SourceError(
                f"blob {sha[:12]} is not in the state directory (on S3? pass the coordinator's --config)"
            ) from None

    def stored(self, record: VersionRecord) -> str | None:
        if record.kind == "rollback":
            aside = [v for v in record.rolled_back if not self._row(v).rolled_back]
            return f"versions {aside} are not marked rolled back in the versions table" if aside else None
        row = self._row(record.version)
        pairs = {
            "param_hash": (row.param_hash, record.param_hash),
            "update_sha": (row.update_sha, record.update_sha256),
            "base_version": (row.base_version, record.base_version),
            "round": (row.round, record.round),
            "checkpoint_sha": (row.checkpoint_sha, record.checkpoint_sha256),
        }
        for name, (mine, signed) in pairs.items():
            # a pruned checkpoint, and a base the first releases did not keep, are left out of the table
            if mine != signed and not (name in ("checkpoint_sha", "base_version") and mine is None):
                return f"the versions table says {name} {mine}, the signed record says {signed}"
        return None

    def close(self) -> None:
        self.store.close()
