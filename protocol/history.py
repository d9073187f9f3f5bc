"""The coordinator's signed history: one chain of records that every node pins and anyone can verify.

The coordinator has an Ed25519 key of its own. Each time the model changes it appends a record, signed with
that key: a ``version`` record (the version, its round, the version its update applies to, its parameter
hash, the sha256 of the published update's bytes and of its checkpoint's) or a ``rollback`` record (the
version made current again and the versions set aside). Every record names the digest of the record before
it, so the records form one chain: a record cannot be changed, left out or reordered without breaking every
signature or link after it. Blobs need no signature of their own: their sha256 is in a signed record.

The coordinator signs its other answers too, each under a domain of its own so that no signature can be
passed off as another kind: ``/v1/info`` (``info``), the fields of ``/v1/round`` that a miner acts on
(``round``), each answer of ``/v1/data`` (``data``: the run, the ids asked for, the body's sha256) and of
``/v1/rounds/{r}`` (``uploads``: the uploads a validator evaluates, with their sha256 and clip scale).

``Chain`` is a verifier's view: records are added in order, each checked (signature, sequence, link, run,
and the rules a version history keeps), and what it holds about each version is what was signed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import HistoryError

HEADER_ANSWER_SIGNATURE = "X-Gradpool-Answer-Signature"  # the coordinator's signature of a data answer
Domain = Literal["record", "info", "round", "data", "uploads"]


class VersionRecord(BaseModel):
    """One link of the chain: what the coordinator signs when the model changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0, description="the record's place in the chain, from 0")
    kind: Literal["version", "rollback"]
    run_id: str
    version: int = Field(ge=0, description="the version made (version), or made current again (rollback)")
    round: int | None = Field(default=None, description="the round that made the version")
    base_version: int | None = Field(default=None, description="the version its update applies to")
    param_hash: str
    update_sha256: str | None = Field(default=None, description="sha256 of the published update's bytes")
    checkpoint_sha256: str | None = Field(default=None, description="sha256 of the version's checkpoint")
    rolled_back: list[int] = Field(default_factory=list, description="rollback: the versions set aside")
    at: float = Field(description="when (Unix time)")
    previous: str | None = Field(description="the digest of the record before (None: the first)")


class SignedRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    record: VersionRecord
    signature: str = Field(description="Ed25519, hex, over the record's canonical JSON")

    @property
    def digest(self) -> str:
        """What the next record names as ``previous``."""
        return hashlib.sha256(canonical(self.record.model_dump(mode="json"))).hexdigest()


class HistoryPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[SignedRecord]
    last: int = Field(description="the newest record's seq (-1: none)")


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: JSON, keys sorted, no spaces."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _message(domain: Domain, fields: Mapping[str, Any]) -> bytes:
    return b"gradpool/" + domain.encode() + b"\n" + canonical(fields)


def sign(key: Ed25519PrivateKey, domain: Domain, fields: Mapping[str, Any]) -> str:
    return key.sign(_message(domain, fields)).hex()


def verify(public_key: str, domain: Domain, fields: Mapping[str, Any], signature: str | None) -> None:
    """Raises HistoryError unless ``signature`` is the key's over ``fields`` in ``domain``."""
    if not signature:
        raise HistoryError(f"the coordinator's {domain} answer is not signed")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), _message(domain, fields))
    except (ValueError, InvalidSignature):
        raise HistoryError(f"the coordinator's signature of its {domain} answer does not verify") from None


def sign_record(key: Ed25519PrivateKey, record: VersionRecord) -> SignedRecord:
    return SignedRecord(record=record, signature=sign(key, "record", record.model_dump(mode="json")))


def data_fields(run_id: str, ids: list[int], body: bytes) -> dict[str, Any]:
    """What the signature of a data answer covers."""
    return {"run_id": run_id, "ids": ids, "sha256": hashlib.sha256(body).hexdigest()}


@dataclass(frozen=True)
class Known:
    """What a verified record says about one version."""

    version: int
    param_hash: str
    base_version: int | None
    update_sha256: str | None
    checkpoint_sha256: str | None
    seq: int


class Chain:
    """The verified prefix of a coordinator's history (``key``: its public key, hex)."""

    def __init__(self, key: str, run_id: str | None = None) -> None:
        self.key, self.run_id = key, run_id
        self.seq: int = -1  # the newest verified record's seq and digest
        self.digest: str | None = None
        self.versions: dict[int, Known] = {}
        self.set_aside: set[int] = set()
        self.head: int | None = None  # the current version
        self.expect: dict[int, str] = {}  # seq -> digest, of records verified before (a rewrite is refused)

    def extend(self, records: Iterable[SignedRecord]) -> None:
        """Verify and add records in order; raises HistoryError, naming the first that fails."""
        for signed in records:
            self._check(signed)

    def known(self, version: int) -> Known | None:
        return self.versions.get(version)

    def _check(self, signed: SignedRecord) -> None:
        r = signed.record
        where = f"record {r.seq} (version {r.version})"
        try:
            verify(self.key, "record", r.model_dump(mode="json"), signed.signature)
        except HistoryError:
            raise HistoryError(f"{where}: the coordinator's signature does not verify") from None
        if r.seq != self.seq + 1:
            raise HistoryError(f"{where}: expected record {self.seq + 1} next")
        if r.previous != self.digest:
            raise HistoryError(f"{where}: does not link to the record before it")
        if self.run_id is not None and r.run_id != self.run_id:
            raise HistoryError(f"{where}: belongs to run {r.run_id!r}, not {self.run_id!r}")
        if r.seq in self.expect and signed.digest != self.expect[r.seq]:
            raise HistoryError(
                f"{where}: differs from the record verified before: the history was rewritten (after a "
                "restore from a backup, delete the node's coordinator-history.json)"
            )
        problem = self._version_rule(r) if r.kind == "version" else self._rollback_rule(r)
        if problem:
            raise HistoryError(f"{where}: {problem}")
        self.run_id, self.seq, self.digest = r.run_id, r.seq, signed.digest
        if r.kind == "version":
            self.versions[r.version] = Known(
                r.version, r.param_hash, r.base_version, r.update_sha256, r.checkpoint_sha256, r.seq
            )
        else:
            self.set_aside |= set(r.rolled_back)
        self.head = r.version

    def _version_rule(self, r: VersionRecord) -> str | None:
        if r.seq == 0:
            ok = r.version == 0 and r.base_version is None and r.update_sha256 is None
            return None if ok else "the first record must be version 0, with no update"
        if r.version in self.versions or r.version <= max(self.versions, default=-1):
            return "a version number used before"
        if r.base_version != self.head:
            return f"its update applies to version {r.base_version}, not the current version {self.head}"
        return None if r.update_sha256 else "a version without a published update"

    def _rollback_rule(self, r: VersionRecord) -> str | None:
        target = self.versions.get(r.version)
        if target is None or r.version in self.set_aside or r.version == self.head:
            return "a rollback to a version that is not an earlier live one"
        if r.param_hash != target.param_hash:
            return "a rollback that names another parameter hash than the version's"
        live_after = sorted(v for v in self.versions if v > r.version and v not in self.set_aside)
        if sorted(r.rolled_back) != live_after:
            return f"a rollback that sets aside {sorted(r.rolled_back)}, not the later versions {live_after}"
        return None
