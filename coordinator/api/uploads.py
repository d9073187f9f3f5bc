"""Uploads straight to the object store (``[blobs] direct_uploads``, coordinator/rounds/direct.py): a
presigned form for one payload, then the commit that hands it to intake."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel

from coordinator.api.deps import RoundNumber, RunDep
from coordinator.api.http_io import parsed, signed_body
from coordinator.errors import SIGNED, Conflict, responses
from coordinator.rounds.direct import DirectUploads
from coordinator.run import Run
from protocol.wire import HEADER_CHECKED, SubmissionReceipt, UploadCommit, UploadIntent, UploadTicket

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


async def _signed(run: Run, request: Request, model: type[M]) -> tuple[str, M, DirectUploads]:
    miner, body, _ = await signed_body(run, request, 4096, miner_only=True)
    if run.direct is None:
        raise Conflict("direct_uploads_off", "this coordinator takes uploads itself: POST .../submissions")
    return miner, parsed(model, body, model.__name__), run.direct


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
