"""What the handlers take from the request: the run and its parts (``Annotated`` dependencies), and the
path parameters every router checks the same way."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from coordinator.rounds.intake import Intake
from coordinator.rounds.queries import Queries
from coordinator.rounds.scoring import Scores
from coordinator.run import Run
from protocol.wire import MAX_NUMBER, RunInfo

RoundNumber = Annotated[int, Path(ge=0, le=MAX_NUMBER)]
VersionNumber = Annotated[int, Path(ge=0, le=MAX_NUMBER)]


async def get_run(request: Request) -> Run:
    """Async, so that FastAPI runs it on the event loop instead of handing it to a worker thread."""
    run: Run = request.app.state.run
    return run


RunDep = Annotated[Run, Depends(get_run)]


async def get_queries(run: RunDep) -> Queries:
    return run.queries


async def get_intake(run: RunDep) -> Intake:
    return run.intake


async def get_scores(run: RunDep) -> Scores:
    return run.scores


async def get_info(run: RunDep) -> RunInfo:
    return run.info


QueriesDep = Annotated[Queries, Depends(get_queries)]
IntakeDep = Annotated[Intake, Depends(get_intake)]
ScoresDep = Annotated[Scores, Depends(get_scores)]
InfoDep = Annotated[RunInfo, Depends(get_info)]
