"""The coordinator's HTTP API: ``create_app(settings) -> FastAPI``.

Handlers never block the event loop: the open round is read from the round state (no SQL); everything that
touches the store, hashes a large body or decodes a payload runs in a worker thread. Signed requests are
read by coordinator/api/http_io.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from coordinator.api import dashboard, downloads, uploads, validators
from coordinator.api.deps import (
    InfoDep,
    IntakeDep,
    QueriesDep,
    RoundNumber,
    RunDep,
    ScoresDep,
    VersionNumber,
)
from coordinator.api.downloads import blob
from coordinator.api.http_io import ProtocolHeader, parsed, signed_body
from coordinator.errors import (
    SIGNED,
    Busy,
    Forbidden,
    NotFound,
    Unauthorized,
    install_handlers,
    responses,
)
from coordinator.hooks import Clock, Hooks
from coordinator.rounds.checks import Check
from coordinator.rounds.modes import RoundMode
from coordinator.rounds.state import RoundWatch
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from coordinator.storage.lease import holder_name
from protocol.wire import (
    HEADER_LEADER,
    HEADER_REPLICA,
    MAX_NUMBER,
    PROTOCOL_VERSION,
    Leaderboard,
    Registration,
    RoundInfo,
    RoundRecord,
    RoundReport,
    RunInfo,
    Status,
    SubmissionReceipt,
    VerdictReceipt,
    Verdicts,
    VersionInfo,
)

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz", responses=responses())
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=responses(503))
async def readyz(request: Request) -> dict[str, str]:
    """Ready once the run is loaded and its closer is running."""
    run: Run | None = getattr(request.app.state, "run", None)
    if run is None or not run.closer.running:
        raise Busy("starting", "the coordinator is still starting", headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/metrics", responses=responses())
async def metrics(run: RunDep) -> Response:
    return Response(run.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/rounds/{round_}/audit", responses=responses(404, 422))
async def audit(round_: RoundNumber, queries: QueriesDep) -> list[dict[str, object]]:
    """The round's audit manifest: each upload's miner, payload hash, size, verdict and reason."""
    return await asyncio.to_thread(queries.audit, round_)


def require_admin(request: Request, run: RunDep) -> None:
    token = run.settings.admin_token
    if token is None:
        raise Forbidden("admin_disabled", "set admin_token in the coordinator's settings to use /v1/admin")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized("bad_admin_token", "missing or wrong admin token")


@router.post(
    "/v1/admin/close-round", dependencies=[Depends(require_admin)], responses=responses(401, 403, 409)
)
async def close_round(run: RunDep) -> dict[str, int]:
    """Close the open round now, with the uploads it has."""
    return {"round": await asyncio.to_thread(run.request_close)}


@router.get("/v1/info", responses=responses())
async def info(info: InfoDep) -> RunInfo:
    return info


@router.get("/v1/status", responses=responses())
async def status(info: InfoDep, q: QueriesDep, scores: ScoresDep) -> Status:
    """The run, the open round, the most recent rounds (``/v1/reports`` pages through all of them) and the
    leaderboard."""

    def read() -> Status:
        stall = q.stall()
        return Status(
            run=info,
            round=q.round_info(),
            miners=q.count_miners(),
            initial_eval_loss=q.initial_eval_loss(),
            rounds=q.reports(),
            leaderboard=scores.board(q.last_closed_round()),
            stalled_rounds=stall.rounds,
            stalled_by=stall.keys,
        )

    return await asyncio.to_thread(read)


@router.get("/v1/reports", responses=responses(422))
async def reports(
    queries: QueriesDep,
    after: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[RoundReport]:
    """The closed rounds after round ``after``, oldest first, at most ``limit``."""
    return await asyncio.to_thread(queries.reports, after, limit)


@router.get("/v1/leaderboard", responses=responses(404, 422))
async def leaderboard(
    queries: QueriesDep, scores: ScoresDep, round: Annotated[int | None, Query(ge=0, le=MAX_NUMBER)] = None
) -> Leaderboard:
    """Every miner's score and record, best first; with ``round``, as of the close of that round."""
    last = queries.last_closed_round()
    if round is not None and (last is None or round > last):
        raise NotFound("not_found", f"round {round} has not closed")
    through = last if round is None else round
    return Leaderboard(round=through, miners=await asyncio.to_thread(scores.board, through))


@router.get("/v1/rounds/{round_}", responses=responses(404, 422))
async def round_record(round_: RoundNumber, queries: QueriesDep) -> RoundRecord:
    """A round's base version and its uploads with their verdicts: what a validator evaluates."""
    record = await asyncio.to_thread(queries.round_record, round_)
    if record is None:
        raise NotFound("not_found", f"round {round_} does not exist")
    return record


@router.get("/v1/rounds/{round_}/payloads/{miner}", responses=responses(404, 416, 409, 422))
async def payload(
    round_: RoundNumber, miner: Annotated[str, Path(max_length=64)], request: Request, run: RunDep
) -> Response:
    """A miner's upload in a round that no longer takes uploads."""
    sha = await asyncio.to_thread(run.queries.payload_sha, round_, miner.lower())
    if sha is None:
        raise NotFound("not_found", f"no upload from {miner[:16]} in round {round_}")
    return await blob(run, request, sha, f"payload-{round_}-{miner[:16]}.safetensors")


@router.post("/v1/rounds/{round_}/verdicts", responses=responses(*SIGNED, 404, 409))
async def verdicts(round_: RoundNumber, request: Request, run: RunDep, intake: IntakeDep) -> VerdictReceipt:
    """A validator's signed evaluation of a closed round's uploads."""
    validator, body, _ = await signed_body(run, request, 4 * 1024 * 1024)
    given = parsed(Verdicts, body, "verdicts")
    n = await asyncio.to_thread(intake.record_verdicts, validator, round_, given.verdicts)
    return VerdictReceipt(round=round_, validator=validator, recorded=n)


@router.get("/v1/round", responses=responses(422))
async def current_round(
    request: Request,
    queries: QueriesDep,
    after: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
    wait_s: Annotated[float, Query(ge=0, le=60)] = 0.0,
    closed: Annotated[int, Query(ge=-1, le=MAX_NUMBER)] = -1,
) -> RoundInfo:
    """The open round. With ``wait_s``, waits up to wait_s for a round later than ``after`` and for round
    ``closed`` to have closed (overlapped rounds: the round behind the open one, and its version)."""
    if wait_s > 0:
        watch: RoundWatch = request.app.state.watch
        await watch.wait(queries.cell, after, wait_s, closed)
    return queries.round_info()


@router.post("/v1/miners", responses=responses(*SIGNED, 429))
async def register(request: Request, run: RunDep, intake: IntakeDep) -> Registration:
    """Register the signer as a miner: refused (403) by an allowlist that does not hold it, and (429, with
    Retry-After) beyond ``[admission]``'s limits on new keys a minute, per client address and overall."""
    miner, _, _ = await signed_body(run, request, 4096)
    address = request.client.host if request.client is not None else ""
    new = await asyncio.to_thread(intake.register, miner, address)
    return Registration(miner=miner, registered=new)


@router.post("/v1/rounds/{round_}/submissions", responses=responses(*SIGNED, 404, 409, 503))
async def submit(round_: RoundNumber, request: Request, run: RunDep) -> SubmissionReceipt:
    miner, body, sha = await signed_body(run, request, run.max_payload_bytes, miner_only=True)
    loop = asyncio.get_running_loop()
    receipt: SubmissionReceipt = await loop.run_in_executor(
        run.intake_pool, run.intake.submit, miner, round_, body, sha
    )
    return receipt


@router.get("/v1/versions/{version}", responses=responses(404, 422))
async def version_info(version: VersionNumber, queries: QueriesDep) -> VersionInfo:
    info = await asyncio.to_thread(queries.version_info, version)
    if info is None:
        raise NotFound("not_found", f"version {version} does not exist")
    return info


def create_app(
    settings: CoordinatorSettings,
    run: Run | None = None,
    checks: Sequence[Check] | None = None,
    hooks: Hooks | None = None,
    clock: Clock | Callable[[], float] = time.time,
    mode: RoundMode | None = None,
) -> FastAPI:
    """The coordinator app; builds its Run at startup (with the check pipeline, test hooks, clock and round
    mode if given) unless one, already built, is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal run
        if run is None:
            run = await asyncio.to_thread(Run, settings, checks, hooks, clock, mode)
        watch = RoundWatch()
        watch.attach(asyncio.get_running_loop())
        run.cell.listen(watch.notify)
        app.state.run, app.state.watch = run, watch
        run.start()
        try:
            yield
        finally:
            await asyncio.to_thread(run.close)

    app = FastAPI(title="gradpool coordinator", version=str(PROTOCOL_VERSION), lifespan=lifespan)
    install_handlers(app)

    name = holder_name(settings.cluster.name)  # this process leads: it serves the run
    app.add_middleware(ProtocolHeader, extra=[(HEADER_REPLICA, name), (HEADER_LEADER, name)])
    # FastAPI matches a request against the routes in turn: the uploads' first, as they come in hundreds
    app.include_router(uploads.router)
    app.include_router(router)
    app.include_router(downloads.router)
    app.include_router(validators.router)
    app.include_router(dashboard.router)
    return app
