"""An upload once read and examined, recorded without its payload: what intake keeps of a payload, and the
uploads a replica takes where they arrive.

With uploads straight to the object store, reading a payload from the bucket and examining it is the
costly part of a commit. A replica that does not lead does it for the commits sent to it: it checks the
signature, reads the payload, checks its size and digest, examines it and keeps it in the bucket (as the
leader would), writes what it found in the store (``checked``), and passes the commit on. It also gives
the forms for those uploads itself (a presigned form is the bucket's to hold). The leader, on a
commit that a replica checked with the same codec, model and size limit, records the upload from that row
under the same round rules, without reading the payload. Anything the replica could not check (a bad
signature, a missing or malformed payload) it passes on as it came, and the leader refuses and records it
as before: every refusal is the leader's, so a replica never holds anything against a miner.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from coordinator.data.tokenizer import RunTokenizer
from coordinator.errors import Unprocessable
from coordinator.settings import CoordinatorSettings
from coordinator.storage.base import Store
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.blobs import BlobNotFoundError, BlobTooLargeError
from coordinator.storage.s3 import S3BlobStore
from protocol.codec import Codec, ParamSpec, make_codec
from protocol.errors import CodecError, SignatureError
from protocol.model import resolve
from protocol.params import model_spec
from protocol.payload import Examined, PayloadHeader
from protocol.signing import verify_request
from protocol.wire import UploadCommit, UploadIntent, UploadTicket

BUCKET_THREADS_PER_CORE, BUCKET_THREADS_MAX = 4, 32  # they wait on the bucket more than they work
ROUND_TTL_S = 0.5  # how long a replica trusts what it read of the open round
W = TypeVar("W", bound=BaseModel)


class Checked(BaseModel):
    """What intake records of a payload: its header, size, digest of its tensors, norm, sketch and kept
    sample, and the blob of its unpacked form if one was kept (None: unpacked again when read)."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    header: PayloadHeader
    size: int
    content_sha256: str
    norm: float
    sketch: bytes
    kept: bytes
    stored_sha256: str | None

    @classmethod
    def of(cls, seen: Examined, body: bytes, sha: str, unpacked_sha: str | None) -> Checked:
        """``sha``: the payload's; ``unpacked_sha``: its unpacked form's blob, where one was put."""
        return cls(
            header=seen.header,
            size=len(body),
            content_sha256=seen.content_sha256,
            norm=seen.norm,
            sketch=seen.sketch.numpy().tobytes(),
            kept=seen.kept.numpy().tobytes(),
            stored_sha256=sha if seen.stored is body else unpacked_sha,
        )


def examine(codec: Codec, spec: ParamSpec, body: bytes, unpack: bool) -> Examined:
    """The codec's examination, a malformed payload refused (422 with the codec's code)."""
    try:
        return codec.examine(body, spec, unpack=unpack)
    except CodecError as e:
        raise Unprocessable(e.code, e.message) from None


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
        key = self.bucket.incoming_key(round_, miner, intent.sha256)
        url, fields = self.bucket.upload_form(key, self.max_bytes, self.expiry_s)
        return UploadTicket(url=url, fields=fields, expires_at=now + self.expiry_s, max_bytes=self.max_bytes)

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
            data, etag = self.bucket.read_incoming(key, self.max_bytes)
        except (BlobNotFoundError, BlobTooLargeError):
            return False
        if hashlib.sha256(data).hexdigest() != sha:
            return False
        try:
            seen = examine(self.codec, self.spec, data, unpack=False)
        except Unprocessable:
            return False
        if seen.header.round != round_:
            return False
        self.bucket.adopt(key, etag, data, sha)
        checked = Checked.of(seen, data, sha, None)
        self.store.add_checked(round_, miner, sha, self.checker, checked.model_dump_json())
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
