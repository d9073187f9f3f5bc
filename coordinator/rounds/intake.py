"""Intake: identities, registrations and uploads. Runs in the intake threads, never on the event loop.

An upload is checked and stored in two steps. The slow part (hashing, decoding with every check, writing
the content-addressed files) runs without the round lock, so uploads do not wait for each other; then,
under the lock, the round rules are checked again and the upload is committed with the next round state
(coordinator/rounds/state.py), so an upload is taken exactly when its round was open for it. An upload
that the replica its commit reached read and examined already (coordinator/rounds/direct.py) takes only
the second step (``submit_checked``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from coordinator.errors import ApiError, Conflict, Forbidden, NotFound, Unauthorized, Unprocessable
from coordinator.hooks import Hooks
from coordinator.metrics import Metrics
from coordinator.rounds.admission import Admission
from coordinator.rounds.scoring import Scores
from coordinator.rounds.sharing import Sharing
from coordinator.rounds.state import RoundCell
from coordinator.settings import CoordinatorSettings
from coordinator.storage.base import Store
from coordinator.storage.blobs import BlobStore
from coordinator.storage.records import HEALTH_FIELDS, Checked, Health, NewSubmission, Upload
from coordinator.storage.scores import COORDINATOR
from protocol.codec import Codec, ParamSpec
from protocol.errors import CodecError, SignatureError
from protocol.payload import Examined, PayloadHeader
from protocol.signing import body_digest, verify_declared, verify_request
from protocol.wire import SubmissionReceipt, Verdict

log = logging.getLogger(__name__)
ROUND_RULES = ("round_closed", "round_not_open", "already_submitted")  # not held against the miner
CheckedUpload = tuple[str, int, str, Checked]  # (miner, round, sha256, what was found of the payload)


def examine(codec: Codec, spec: ParamSpec, body: bytes, unpack: bool) -> Examined:
    """The codec's examination, a malformed payload refused (422 with the codec's code)."""
    try:
        return codec.examine(body, spec, unpack=unpack)
    except CodecError as e:
        raise Unprocessable(e.code, e.message) from None


@dataclass(frozen=True)
class IntakeSettings:
    """Intake's slice of the coordinator's settings."""

    signature_window_s: float
    validators: list[str] | None
    # Each upload's unpacked form (``Examined.stored``) is kept beside it, so that closing the round only
    # adds it, where blobs are files on the coordinator's disk. In a bucket it would cost the coordinator
    # about five times each payload's bytes out, and again in at the close, where the payloads themselves go
    # straight to the bucket: there closing unpacks each payload again (coordinator/rounds/reading.py).
    keep_unpacked: bool = True

    @classmethod
    def of(cls, s: CoordinatorSettings) -> IntakeSettings:
        return cls(s.signature_window_s, s.validation.validators, keep_unpacked=s.blobs.backend == "file")


class Intake:
    def __init__(
        self,
        cell: RoundCell,
        store: Store,
        blobs: BlobStore,
        codec: Codec,
        spec: ParamSpec,
        scores: Scores,
        metrics: Metrics,
        settings: IntakeSettings,
        admission: Admission,
        hooks: Hooks,
        clock: Callable[[], float],
        sharing: Sharing | None = None,
    ) -> None:
        self.cell, self.store, self.blobs, self.codec, self.spec = cell, store, blobs, codec, spec
        self.scores, self.metrics, self.hooks, self.clock = scores, metrics, hooks, clock
        self.window_s = settings.signature_window_s
        self.admission, self.sharing = admission, sharing
        self.validators = None if settings.validators is None else {k.lower() for k in settings.validators}
        self.keep_unpacked = settings.keep_unpacked
        self._miners: set[str] = set()  # keys known to be registered, which spares the store a read

    # -- identity -----------------------------------------------------------------------------------------
    def authenticate(self, headers: Mapping[str, str], method: str, path: str, body: bytes) -> str:
        """The signer of a request whose body is in hand; refuses unsigned, forged, expired and replayed
        ones."""
        signer, nonce = self.verify(headers, method, path, body)
        self._fresh(nonce)
        return signer

    def verify(self, headers: Mapping[str, str], method: str, path: str, body: bytes) -> tuple[str, str]:
        """(signer, nonce) of a request whose body is in hand, its nonce not yet recorded (``fresh``)."""
        try:
            return verify_request(headers, method, path, body, window_s=self.window_s, now=self.clock())
        except SignatureError as e:
            raise Unauthorized(e.code, e.message) from None

    def authenticate_declared(self, headers: Mapping[str, str], method: str, path: str) -> tuple[str, str]:
        """The signer and the body digest of a request whose body is not read yet (it may be large)."""
        try:
            signer, nonce, digest = verify_declared(
                headers, method, path, window_s=self.window_s, now=self.clock()
            )
        except SignatureError as e:
            raise Unauthorized(e.code, e.message) from None
        self._fresh(nonce)
        return signer, digest

    @staticmethod
    def check_body(body: bytes, digest: str) -> None:
        if body_digest(body) != digest:
            raise Unauthorized("bad_signature", "the body does not match its signed sha256")

    def _fresh(self, nonce: str) -> None:
        """Nonces are kept (durably) for twice the signature window, after which the timestamp check alone
        refuses a replay."""
        if nonce not in self.fresh([nonce]):
            raise Unauthorized("replayed_nonce", "this nonce was used before")

    def fresh(self, nonces: Sequence[str]) -> set[str]:
        """Record several requests' nonces at once, as ``authenticate`` records one: those not used
        before (a nonce twice among them is fresh once)."""
        now = self.clock()
        return self.store.remember_nonces(nonces, now + 2 * self.window_s, now)

    def know_miners(self, miners: Sequence[str]) -> None:
        """Look up at once which of ``miners`` are registered, so that ``require_miner`` needs no read."""
        self._miners |= self.store.miners_among([m for m in miners if m not in self._miners])

    def require_miner(self, miner: str) -> None:
        if miner in self._miners:  # a registration is never taken back
            return
        if not self.store.is_miner(miner):
            raise Forbidden("unknown_miner", "register (POST /v1/miners) before uploading")
        self._miners.add(miner)

    # -- registration -------------------------------------------------------------------------------------
    def register(self, miner: str, address: str = "") -> bool:
        """A miner's registration (``address``: the client's, which the registration limits count by)."""
        self.admission.check_key(miner)
        if not self.store.is_miner(miner):
            self.admission.count_new(address, self.clock())
        cell = self.cell
        with cell.lock:
            state = cell.state
            new = self.store.register(miner, state.round, self.clock())
            if miner not in state.expected:
                cell.swap(dataclasses.replace(state, expected=state.expected | {miner}))
        if new:
            log.info("round %d: miner %s registered", state.round, miner[:12])
            self.metrics.miners.inc()
        return new

    # -- verdicts -----------------------------------------------------------------------------------------
    def record_verdicts(self, validator: str, round_: int, verdicts: list[Verdict]) -> int:
        if self.validators is not None and validator not in self.validators:
            raise Forbidden("not_a_validator", "this coordinator only takes verdicts from its validators")
        if validator == COORDINATOR:
            raise Forbidden("not_a_validator", "that name is reserved")
        state = self.cell.state
        if round_ > state.round:
            raise NotFound("not_found", f"round {round_} does not exist")
        if round_ == state.round or (state.behind is not None and round_ == state.behind.round):
            raise Conflict("round_open", f"round {round_} has not closed; evaluate closed rounds")
        if self.sharing is not None:  # only what it was assigned, while the round takes verdicts
            verdicts = self.sharing.taken(round_, validator, verdicts)
        n = self.scores.record_verdicts(round_, validator, verdicts, self.clock())
        if self.sharing is not None:
            self.sharing.arrived.set()
        log.info("round %d: %d verdicts from validator %s", round_, n, validator[:12])
        return n

    # -- uploads ------------------------------------------------------------------------------------------
    def submit(
        self, miner: str, round_: int, body: bytes, sha: str, keep: Callable[[], object] | None = None
    ) -> SubmissionReceipt:
        """Check and store one upload (``sha``: its sha256, already checked against the signature; ``keep``:
        how it is kept once checked, where not put into the blob store: a direct upload is copied within
        the bucket). A registered miner's refused upload (malformed, wrong round or version) is recorded
        against it."""
        self.require_miner(miner)
        self.check_round(round_)
        try:
            if (receipt := self.earlier_upload(miner, round_, sha)) is not None:
                return receipt
            seen = examine(self.codec, self.spec, body, unpack=self.keep_unpacked)
            self._check_header(seen.header, round_)
            # Content-addressed files, written before taking the lock (at worst an orphan file): the slow part
            # of intake does not serialise the uploads. As durable as the SQLite row that points to them.
            if keep is None:
                self.blobs.put(body, durable=False)
            else:
                keep()
            unpacked = None  # the unpacked form, where it is not the payload itself and is kept
            if self.keep_unpacked and seen.stored is not body:
                unpacked = self.blobs.put(seen.stored, durable=False)
            return self._record(miner, round_, sha, Checked.of(seen, body, sha, unpacked))
        except (Unprocessable, Conflict) as e:
            self._held_against(miner, round_, e)
            raise

    def submit_checked(self, miner: str, round_: int, sha: str, checked: Checked) -> SubmissionReceipt:
        """Record an upload that a replica read, examined and kept where its commit arrived
        (coordinator/rounds/direct.py), under the same round rules as ``submit``."""
        [taken] = self.submit_checked_all([(miner, round_, sha, checked)])
        if isinstance(taken, Exception):
            raise taken
        return taken

    def submit_checked_all(self, uploads: Sequence[CheckedUpload]) -> list[SubmissionReceipt | Exception]:
        """``submit_checked`` for several uploads (miner, round, sha256, what was found), those taken
        recorded in one transaction: each one's receipt or refusal (or the store's error, for those that
        were to be recorded when it failed), in order."""
        done: dict[int, SubmissionReceipt | Exception] = {}
        for i, (miner, round_, sha, checked) in enumerate(uploads):
            try:
                self.require_miner(miner)
                self.check_round(round_)
                if (receipt := self.earlier_upload(miner, round_, sha)) is not None:
                    done[i] = receipt
                    continue
                self._check_header(checked.header, round_)
            except ApiError as e:
                done[i] = e
        pending = [i for i in range(len(uploads)) if i not in done]  # to record, the round rules kept so far
        try:
            recorded: list[SubmissionReceipt | Exception] = [*self._record_all([uploads[i] for i in pending])]
        except Exception as e:  # the store failed: nothing of these was recorded
            recorded = [e] * len(pending)
        done.update(zip(pending, recorded, strict=True))
        results = [done[i] for i in range(len(uploads))]
        for (miner, round_, _, _), r in zip(uploads, results, strict=True):
            if isinstance(r, Unprocessable | Conflict):
                self._held_against(miner, round_, r)
            elif isinstance(r, SubmissionReceipt) and not r.duplicate:
                self.metrics.checked_elsewhere.inc()
        return results

    def _held_against(self, miner: str, round_: int, refusal: Unprocessable | Conflict) -> None:
        """A refusal of a registered miner's upload is recorded against it, but for the round's rules."""
        if refusal.code not in ROUND_RULES:
            self.store.record_refusal(round_, miner, refusal.code, self.clock())

    def _check_header(self, header: PayloadHeader, round_: int) -> None:
        if header.round != round_:
            raise Unprocessable("round_mismatch", f"payload says round {header.round}, URL says {round_}")
        self._check_version(header.base_version, round_)

    def _record(self, miner: str, round_: int, sha: str, checked: Checked) -> SubmissionReceipt:
        [recorded] = self._record_all([(miner, round_, sha, checked)])
        if isinstance(recorded, Conflict):
            raise recorded
        return recorded

    def _record_all(self, uploads: Sequence[CheckedUpload]) -> list[SubmissionReceipt | Conflict]:
        """Under the round lock: the round rules checked again, and the uploads that keep them committed
        in one transaction with the next round state (coordinator/rounds/state.py)."""
        if self.hooks.before_intake_commit is not None:
            for miner, round_, _, _ in uploads:
                self.hooks.before_intake_commit(round_, miner)
        results: list[SubmissionReceipt | Conflict] = []
        new: dict[str, tuple[NewSubmission, Checked]] = {}  # by miner
        with self.cell.lock:
            state, now = self.cell.state, self.clock()
            for miner, round_, sha, checked in uploads:
                try:
                    self.check_round(round_)
                    receipt: SubmissionReceipt | None
                    if miner in new:  # twice among these uploads
                        receipt = _again(round_, miner, sha, new[miner][0])
                    else:  # a concurrent upload of the same miner may have won the race
                        receipt = self.earlier_upload(miner, round_, sha)
                    if receipt is None:
                        self._check_version(checked.header.base_version, round_)
                except Conflict as e:
                    results.append(e)
                    continue
                if receipt is None:
                    new[miner] = (_submission(miner, round_, sha, checked, now), checked)
                    receipt = SubmissionReceipt(
                        round=round_, miner=miner, payload_sha256=sha, bytes=checked.size
                    )
                results.append(receipt)
            taken = frozenset(new)
            if new:
                self.store.add_submissions([s for s, _ in new.values()])
                self.cell.swap(
                    dataclasses.replace(
                        state,
                        uploaded=state.uploaded | taken,
                        expected=state.expected | taken,
                        first_upload_at=now if state.first_upload_at is None else state.first_upload_at,
                    )
                )
        for s, checked in new.values():
            log.info(
                "round %d: upload from miner %s, %d bytes, base version %d",
                *(s.round, s.miner[:12], checked.size, checked.header.base_version),
            )
            self.metrics.bytes_in.inc(checked.size)
        if taken:
            self.metrics.uploads.set(len(state.uploaded | taken))
        return results

    def earlier_upload(self, miner: str, round_: int, sha: str) -> SubmissionReceipt | None:
        """The receipt of an identical earlier upload (idempotent); a different one is a conflict."""
        state = self.cell.state
        if round_ == state.round and miner not in state.uploaded:
            return None  # the open round's state holds every upload it took
        prev = self.store.upload(round_, miner)
        if prev is None:
            return None
        return _again(round_, miner, sha, prev)

    def _check_version(self, base_version: int, round_: int) -> None:
        """The round's version, or (overlapped rounds) the one the round behind published since."""
        state = self.cell.state
        if base_version not in (state.version, state.head):
            also = "" if state.head == state.version else f" or {state.head}"
            raise Conflict(
                "stale_version",
                f"payload was trained on version {base_version}; "
                f"round {round_} is for version {state.version}{also}",
            )

    def check_round(self, round_: int) -> None:
        cur = self.cell.state
        if round_ < cur.round or (round_ == cur.round and cur.status != "open"):
            raise Conflict("round_closed", f"round {round_} is closed; the current round is {cur.round}")
        if round_ > cur.round:
            raise Conflict("round_not_open", f"round {round_} is not open; the current round is {cur.round}")


def _again(round_: int, miner: str, sha: str, prev: Upload | NewSubmission) -> SubmissionReceipt:
    """The receipt of an upload sent again (idempotent); another payload of the same miner is a conflict."""
    if prev.sha256 != sha:
        raise Conflict("already_submitted", f"miner already uploaded a different payload in round {round_}")
    return SubmissionReceipt(round=round_, miner=miner, payload_sha256=sha, bytes=prev.size, duplicate=True)


def _submission(miner: str, round_: int, sha: str, checked: Checked, now: float) -> NewSubmission:
    header = checked.header
    return NewSubmission(
        round=round_,
        miner=miner,
        sha256=sha,
        content_sha256=checked.content_sha256,
        size=checked.size,
        norm=checked.norm,
        sketch=checked.sketch,
        kept=checked.kept,
        stored_sha256=checked.stored_sha256,
        compute_s=header.stats.compute_s,
        received_at=now,
        health=Health.reported(*(getattr(header.stats, f) for f in HEALTH_FIELDS)),
    )
