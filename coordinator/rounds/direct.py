"""Uploads straight from the miners to the object store (``[blobs] direct_uploads``): a presigned form for
the miner's own key, then a commit, which the coordinator takes through the same intake (the same checks,
refusals and records) as an upload sent to it. Only the commit's few bytes reach the coordinator from the
miner; it reads the payload from the bucket and keeps it there by a copy within the bucket, unless the
replica that the commit reached has done so already (coordinator/rounds/checked.py)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from pydantic import ValidationError

from coordinator.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from coordinator.rounds.checked import Checked
from coordinator.rounds.intake import Intake
from coordinator.storage.blobs import BlobNotFoundError, BlobTooLargeError
from coordinator.storage.s3 import S3BlobStore
from protocol.wire import SubmissionReceipt, UploadIntent, UploadTicket

log = logging.getLogger(__name__)


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
        """``checker``: the ``checker_id`` of this run's check (coordinator/rounds/checked.py), whose rows
        written by other replicas it takes."""
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
        key = self.bucket.incoming_key(round_, miner, intent.sha256)
        url, fields = self.bucket.upload_form(key, self.max_bytes, self.expiry_s)
        return UploadTicket(
            url=url, fields=fields, expires_at=self.clock() + self.expiry_s, max_bytes=self.max_bytes
        )

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
        if found is not None:
            try:  # the replica the commit reached read, examined and kept the payload
                there = Checked.model_validate_json(found)
            except ValidationError:
                log.warning("round %d: unreadable check of miner %s's upload; reading it", round_, miner[:12])
            else:
                return self.intake.submit_checked(miner, round_, sha, there)
        key = self.bucket.incoming_key(round_, miner, sha)
        try:
            body, etag = self.bucket.read_incoming(key, self.max_bytes)
        except BlobNotFoundError:
            raise NotFound(
                "upload_missing", "nothing under this upload's key: POST the payload with the form first"
            ) from None
        except BlobTooLargeError as e:
            self.bucket.forget_object(key)
            raise PayloadTooLarge("payload_too_large", f"the uploaded payload is too large: {e}") from None
        try:
            if hashlib.sha256(body).hexdigest() != sha:
                raise Unprocessable(
                    "digest_mismatch", "the uploaded payload does not have the sha256 committed"
                )
            return self.intake.submit(
                miner, round_, body, sha, keep=lambda: self.bucket.adopt(key, etag, body, sha)
            )
        except (Unprocessable, Conflict):  # refused: taken once, as an upload sent to the coordinator is
            self.bucket.forget_object(key)
            raise
