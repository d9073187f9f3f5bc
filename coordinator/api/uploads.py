"""Uploads straight to the object store (``[blobs] direct_uploads``, coordinator/rounds/direct.py): a
presigned form for one payload, then the commit that hands it to intake; and the commits standbys checked,
passed on together (coordinator/api/batches.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel

from coordinator.api.batches import (
    BATCH_BYTES,
    BATCH_PATH,
    COMMIT_BYTES,
    BatchAnswers,
    CommitAnswer,
    CommitBatch,
    PassedCommit,
    commit_round,
)
from coordinator.api.deps import RoundNumber, RunDep
from coordinator.api.http_io import parsed, read_body, signed_body
from coordinator.errors import (
    FAILED,
    SIGNED,
    ApiError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
    error_body,
    responses,
)
from coordinator.rounds.direct import DirectUploads
from coordinator.run import Run
from protocol.wire import (
    HEADER_CHECKED,
    MAX_NUMBER,
    SubmissionReceipt,
    UploadCommit,
    UploadIntent,
    UploadTicket,
)

log = logging.getLogger(__name__)
router = APIRouter()
M = TypeVar("M", bound=BaseModel)


async def _signed(run: Run, request: Request, model: type[M]) -> tuple[str, M, DirectUploads]:
    miner, body, _ = await signed_body(run, request, COMMIT_BYTES, miner_only=True)
    return miner, parsed(model, body, model.__name__), _direct(run)


def _direct(run: Run) -> DirectUploads:
    if run.direct is None:
        raise Conflict("direct_uploads_off", "this coordinator takes uploads itself: POST .../submissions")
    return run.direct


@router.post("/v1/rounds/{round_}/uploads", responses=responses(*SIGNED, 409))
async def upload_form(round_: RoundNumber, request: Request, run: RunDep) -> UploadTicket:
    """A presigned form to upload one payload of the signer's straight to the object store: its own key,
    at most the run's payload size, valid ``[blobs] redirect_expiry_s``. Then commit it."""
    miner, intent, direct = await _signed(run, request, UploadIntent)
    return await asyncio.to_thread(direct.ticket, miner, round_, intent)


@router.post("/v1/rounds/{round_}/commits", responses=responses(*SIGNED, 404, 409, 503))
async def commit(round_: RoundNumber, request: Request, run: RunDep) -> SubmissionReceipt:
    """Take the payload the signer uploaded with its form as its upload of the round: read from the object
    store and checked as an upload sent here is (404 ``upload_missing``: nothing there; 413: too large;
    422 ``digest_mismatch``: not the bytes committed)."""
    miner, given, direct = await _signed(run, request, UploadCommit)
    checked = HEADER_CHECKED in request.headers  # by the standby it reached, which says so
    loop = asyncio.get_running_loop()
    receipt: SubmissionReceipt = await loop.run_in_executor(
        run.intake_pool, direct.commit, miner, round_, given.sha256, checked
    )
    return receipt


@router.post(BATCH_PATH, responses=responses(408, 409, 413, 422))
async def passed_commits(request: Request, run: RunDep) -> BatchAnswers:
    """Commits a standby checked, each as its miner signed it, each taken as if it had come alone
    (coordinator/api/batches.py): the answers in the batch's order, each the status, body and headers the
    commit alone would have had."""
    body = await read_body(request, BATCH_BYTES, run.settings.read_timeout_s)
    batch = parsed(CommitBatch, body, "CommitBatch")
    direct = _direct(run)
    run.metrics.passed_batches.inc()
    run.metrics.passed_commits.inc(len(batch.commits))
    loop = asyncio.get_running_loop()
    answers = await loop.run_in_executor(run.intake_pool, take_batch, run, direct, batch.commits)
    return BatchAnswers(answers=answers)


@dataclass(frozen=True)
class Opened:
    """A passed commit whose signature holds: its signer, nonce, round and body."""

    miner: str
    nonce: str
    round: int
    body: bytes


Outcome = SubmissionReceipt | Exception


def take_batch(run: Run, direct: DirectUploads, commits: list[PassedCommit]) -> list[CommitAnswer]:
    """Each commit checked and taken in the order ``commit`` takes one sent here (in an intake thread): its
    signature, its nonce, its signer's registration, its body, the upload. What every commit needs of the
    store (its nonce recorded, its signer's registration, what the standby found, the upload recorded)
    is read or written for all of them at once."""
    outcome: dict[int, Outcome] = {}
    opened: dict[int, Opened] = {}
    for i, c in enumerate(commits):
        try:
            opened[i] = _open(run, c)
        except ApiError as e:
            outcome[i] = e
    try:
        fresh = run.intake.fresh([o.nonce for o in opened.values()])
        run.intake.know_miners([o.miner for o in opened.values() if o.nonce in fresh])
    except Exception as e:  # as each would have failed alone
        outcome |= dict.fromkeys(opened, e)
        opened, fresh = {}, set()
    taken: list[tuple[int, tuple[str, int, str]]] = []
    for i, o in opened.items():
        try:
            if o.nonce not in fresh:  # used before, or twice in this batch
                raise Unauthorized("replayed_nonce", "this nonce was used before")
            fresh.discard(o.nonce)
            run.intake.require_miner(o.miner)
            taken.append((i, (o.miner, o.round, parsed(UploadCommit, o.body, UploadCommit.__name__).sha256)))
        except ApiError as e:
            outcome[i] = e
    try:
        results: list[Outcome] = direct.commit_all([upload for _, upload in taken])
    except Exception as e:
        results = [e] * len(taken)
    outcome |= zip([i for i, _ in taken], results, strict=True)
    return [_answer(run, outcome[i]) for i in range(len(commits))]


def _open(run: Run, commit: PassedCommit) -> Opened:
    """A passed commit's round, size and signature, checked as the commit route checks them."""
    round_ = commit_round(commit.path)
    if round_ is None:
        raise NotFound("not_found", f"{commit.path} is not a commit's path")
    if round_ > MAX_NUMBER:
        raise Unprocessable("invalid_request", f"round_: less than or equal to {MAX_NUMBER}")
    body = commit.body.encode()
    if len(body) > COMMIT_BYTES:
        raise PayloadTooLarge("payload_too_large", f"body exceeds the {COMMIT_BYTES}-byte limit")
    miner, nonce = run.intake.verify(commit.headers, "POST", commit.path, body)
    return Opened(miner, nonce, round_, body)


def _answer(run: Run, outcome: Outcome) -> CommitAnswer:
    """The answer a commit with this outcome would have had alone."""
    if isinstance(outcome, SubmissionReceipt):
        return CommitAnswer(status=200, body=outcome.model_dump_json())
    if not isinstance(outcome, ApiError):  # as any route: the error logged, the commit answered 500
        log.error("internal error: %s: %s", type(outcome).__name__, outcome)
        return CommitAnswer(status=500, body=json.dumps(error_body("internal_error", FAILED)))
    if outcome.status < 500:
        run.metrics.refusals.labels(outcome.code).inc()
    body = json.dumps(error_body(outcome.code, outcome.message))
    return CommitAnswer(status=outcome.status, body=body, headers=outcome.headers or {})
