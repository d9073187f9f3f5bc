"""Uploads straight from the miners to the object store (``[blobs] direct_uploads``): a presigned form for
the miner's own key, then a commit, which the coordinator takes through the same intake (the same checks,
refusals and records) as an upload sent to it. Only the commit's few bytes reach the coordinator from the
miner; it reads the payload from the bucket and keeps it there by a copy within the bucket.

Reading a payload from the bucket and examining it is the costly part of a commit. A replica that does not
lead (``ReplicaIntake``) does it for the commits sent to it: it checks the signature, reads the payload,
checks its size and digest, examines it and keeps it in the bucket as the leader would, writes what it
found in the store (``Checked``), and passes the commit on. It also gives
the forms itself (a presigned form is the bucket's to hold). The leader, on a commit that a replica
checked with the same codec, model and size limit, records the upload from that row under the same round
rules, without reading the payload. Anything the replica could not check (a bad signature, a missing or
malformed payload) it passes on as it came, and the leader refuses and records it as before: every refusal
is the leader's, so a replica never holds anything against a miner.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from coordinator.data.tokenizer import RunTokenizer
from coordinator.errors import ApiError, Conflict, NotFound, PayloadTooLarge, Unprocessable
from coordinator.rounds.intake import CheckedUpload, Intake, examine
from coordinator.settings import CoordinatorSettings
from coordinator.storage.base import Store
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.blobs import BlobNotFoundError, BlobTooLargeError
from coordinator.storage.records import Checked
from coordinator.storage.s3 import S3BlobStore
from protocol.codec import Codec, ParamSpec, make_codec
from protocol.errors import SignatureError
from protocol.model import resolve
from protocol.params import model_spec
from protocol.signing import verify_request
from protocol.wire import SubmissionReceipt, UploadCommit, UploadIntent, UploadTicket

ROUND_TTL_S = 0.5  # how long a replica trusts what it read of the open round
BUCKET_THREADS_PER_CORE, BUCKET_THREADS_MAX = 4, 32  # they wait on the bucket more than they work
W = TypeVar("W", bound=BaseModel)


def checker_id(codec: BaseModel, max_bytes: int, spec: ParamSpec) -> str:
    """What a check depends on (``codec``: the ``[codec]`` settings): a row written by a replica that
    examines otherwise is not used."""
    shapes = hashlib.sha256(repr(list(spec)).encode()).hexdigest()[:16]
    return f"{codec.model_dump_json()}/{max_bytes}/{shapes}"


def payload_cap(settings: CoordinatorSettings, codec: Codec, spec: ParamSpec) -> int:
    """The largest upload taken: the largest valid payload, or ``max_payload_bytes`` if smaller."""
    cap = codec.max_payload_bytes(spec)
    return cap if settings.max_payload_bytes is None else min(cap, settings.max_payload_bytes)


def bucket_threads() -> int:
    """Threads for work that mostly waits on a bucket's answers: a few per core, capped (each also takes
    a database connection for a moment)."""
    return min((os.cpu_count() or 1) * BUCKET_THREADS_PER_CORE, BUCKET_THREADS_MAX)


def upload_form(
    bucket: S3BlobStore, round_: int, miner: str, sha: str, max_bytes: int, expiry_s: float, now: float
) -> UploadTicket:
    """The presigned form for one payload (``sha``) of ``miner`` in ``round_``, under its own key."""
    url, fields = bucket.upload_form(bucket.incoming_key(round_, miner, sha), max_bytes, expiry_s)
    return UploadTicket(url=url, fields=fields, expires_at=now + expiry_s, max_bytes=max_bytes)


def read_committed(bucket: S3BlobStore, key: str, max_bytes: int, sha: str) -> tuple[bytes, str]:
    """The payload a commit names and its ETag, read from the bucket: 404 ``upload_missing`` if there is
    none, 413 beyond ``max_bytes``, 422 ``digest_mismatch`` if it is not the bytes committed."""
    try:
        body, etag = bucket.read_incoming(key, max_bytes)
    except BlobNotFoundError:
        raise NotFound(
            "upload_missing", "nothing under this upload's key: POST the payload with the form first"
        ) from None
    except BlobTooLargeError as e:
        raise PayloadTooLarge("payload_too_large", f"the uploaded payload is too large: {e}") from None
    if hashlib.sha256(body).hexdigest() != sha:
        raise Unprocessable("digest_mismatch", "the uploaded payload does not have the sha256 committed")
    return body, etag


class DirectUploads:
    def __init__(
        self,
        bucket: S3BlobStore,
        intake: Intake,
        max_bytes: int,
        expiry_s: float,
        clock: Callable[[], float],
        checker: str,
    ) -> None:
        """``checker``: the ``checker_id`` of this run's check, whose rows written by other replicas it
        takes."""
        self.bucket, self.intake, self.max_bytes = bucket, intake, max_bytes
        self.expiry_s, self.clock, self.checker = expiry_s, clock, checker

    def ticket(self, miner: str, round_: int, intent: UploadIntent) -> UploadTicket:
        """A form for one payload of this miner in this open round."""
        self.intake.require_miner(miner)
        self.intake.check_round(round_)
        if intent.bytes > self.max_bytes:
            raise PayloadTooLarge(
                "payload_too_large", f"{intent.bytes} bytes exceed the {self.max_bytes}-byte limit"
            )
        now = self.clock()
        return upload_form(self.bucket, round_, miner, intent.sha256, self.max_bytes, self.expiry_s, now)

    def commit(self, miner: str, round_: int, sha: str, checked: bool = False) -> SubmissionReceipt:
        """Take the payload the miner put under its key as its upload of the round. The object stays in
        the bucket until the round closes (the closer removes the round's at once) unless it is refused.
        ``checked``: the standby the commit reached says it checked it (what it found is then taken from
        the store, if it is there and made as this run checks)."""
        self.intake.require_miner(miner)
        self.intake.check_round(round_)
        if (receipt := self.intake.earlier_upload(miner, round_, sha)) is not None:
            return receipt  # a commit sent again
        found = self.intake.store.checked(round_, miner, sha, self.checker) if checked else None
        if found is not None:  # the replica the commit reached read, examined and kept the payload
            return self.intake.submit_checked(miner, round_, sha, found)
        key = self.bucket.incoming_key(round_, miner, sha)
        try:
            body, etag = read_committed(self.bucket, key, self.max_bytes, sha)
            return self.intake.submit(
                miner, round_, body, sha, keep=lambda: self.bucket.adopt(key, etag, body, sha)
            )
        except (PayloadTooLarge, Unprocessable, Conflict):  # refused: taken once, as an upload sent here is
            self.bucket.forget_object(key)
            raise

    def commit_all(self, commits: list[tuple[str, int, str]]) -> list[SubmissionReceipt | Exception]:
        """``commit`` for several commits (miner, round, sha256) that standbys say they checked: what they
        found read at once, and the uploads found recorded together; each commit's receipt or refusal,
        in order."""
        found = self.intake.store.checked_among([(r, m, sha) for m, r, sha in commits], self.checker)
        done: dict[int, SubmissionReceipt | Exception] = {}
        checked: list[tuple[int, CheckedUpload]] = []
        for i, (miner, round_, sha) in enumerate(commits):
            if (seen := found.get((round_, miner, sha))) is not None:
                checked.append((i, (miner, round_, sha, seen)))
                continue
            try:  # no check to take: the payload is read here
                done[i] = self.commit(miner, round_, sha)
            except Exception as e:
                done[i] = e
        taken = self.intake.submit_checked_all([upload for _, upload in checked])
        done.update(zip([i for i, _ in checked], taken, strict=True))
        return [done[i] for i in range(len(commits))]


@dataclass
class ReplicaIntake:
    """What a replica that does not lead takes on itself of the uploads sent to it (the leader does the
    same for its own in intake): the forms of uploads straight to the bucket, and the check of their
    commits. Anything it cannot do as the leader would, it leaves to the leader (None, False), which then
    answers as before. ``checker``: its ``checker_id``."""

    store: Store
    bucket: S3BlobStore
    codec: Codec
    spec: ParamSpec
    max_bytes: int
    checker: str
    window_s: float
    expiry_s: float  # a form's life ([blobs] redirect_expiry_s)
    clock: Callable[[], float] = time.time
    miners: set[str] = field(default_factory=set)  # keys known to be registered
    # (when read, the open round then)
    _open: tuple[float, int | None] = field(default=(float("-inf"), None), init=False, repr=False)

    @classmethod
    def of(cls, settings: CoordinatorSettings, store: Store) -> ReplicaIntake:
        """From the run's settings, which the leader shares: the same model, codec and size limit."""
        tokenizer = RunTokenizer(settings.data.tokenizer)
        spec = model_spec(resolve(settings.model, tokenizer.vocab_size))
        codec = make_codec(settings.codec.name, settings.codec.k, settings.codec.tile)
        bucket = make_blob_store(settings.blobs, settings.state_dir / "blobs")
        if not isinstance(bucket, S3BlobStore):
            raise ValueError("replicas take uploads only when they go straight to an s3 bucket")
        max_bytes = payload_cap(settings, codec, spec)
        checker = checker_id(settings.codec, max_bytes, spec)
        window, expiry = settings.signature_window_s, settings.blobs.redirect_expiry_s
        return cls(store, bucket, codec, spec, max_bytes, checker, window, expiry)

    def ticket(self, headers: Mapping[str, str], path: str, body: bytes, round_: int) -> UploadTicket | None:
        """The form for a registered miner's payload of the open round, as the leader gives it; None for
        anything else. The open round is the store's, read at most every ``ROUND_TTL_S``: a form given
        for a round that has just closed is refused at its commit."""
        signed = self._signed(headers, path, body, UploadIntent)
        if signed is None or round_ != self._open_round():
            return None
        miner, nonce, intent = signed
        if intent.bytes > self.max_bytes:
            return None
        now = self.clock()
        if not self.store.remember_nonce(nonce, now + 2 * self.window_s, now):
            return None  # a replay: the leader says so
        return upload_form(self.bucket, round_, miner, intent.sha256, self.max_bytes, self.expiry_s, now)

    def check(self, headers: Mapping[str, str], path: str, body: bytes, round_: int) -> bool:
        """Check the commit in ``body`` and write what was found; False (nothing written) if it is not one
        to check here, which the leader then reads and judges itself. The commit's nonce is the leader's
        to record: it checks the signature again."""
        signed = self._signed(headers, path, body, UploadCommit)
        if signed is None:
            return False
        miner, _, commit = signed
        sha = commit.sha256
        key = self.bucket.incoming_key(round_, miner, sha)
        try:
            data, etag = read_committed(self.bucket, key, self.max_bytes, sha)
            seen = examine(self.codec, self.spec, data, unpack=False)
        except ApiError:  # missing, too large, not the bytes committed, malformed: the leader's to refuse
            return False
        if seen.header.round != round_:
            return False
        self.bucket.adopt(key, etag, data, sha)
        self.store.add_checked(round_, miner, sha, self.checker, Checked.of(seen, data, sha, None))
        return True

    def _signed(
        self, headers: Mapping[str, str], path: str, body: bytes, model: type[W]
    ) -> tuple[str, str, W] | None:
        """(signer, nonce, body) of a request signed by a registered miner with a well-formed body."""
        try:
            miner, nonce = verify_request(
                headers, "POST", path, body, window_s=self.window_s, now=self.clock()
            )
            given = model.model_validate_json(body)
        except (SignatureError, ValidationError):
            return None
        if miner not in self.miners:
            if not self.store.is_miner(miner):
                return None
            self.miners.add(miner)  # a registration is never taken back
        return miner, nonce, given

    def _open_round(self) -> int | None:
        at, known = self._open
        if time.monotonic() - at >= ROUND_TTL_S:
            unclosed = self.store.unclosed_rounds()
            known = unclosed[-1].round if unclosed else None
            self._open = (time.monotonic(), known)
        return known
