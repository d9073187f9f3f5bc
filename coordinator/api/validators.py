"""What validators read of an evaluation shared among them (``[validation] assign``,
coordinator/rounds/sharing.py): a round's tasks, and every validator's record."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import RoundNumber, RunDep
from coordinator.errors import NotFound, responses
from coordinator.rounds.sharing import Sharing
from protocol.sharing import RoundTasks, ValidatorRecords

router = APIRouter()
HexKey = Annotated[str | None, Query(min_length=64, max_length=64, pattern="^[0-9a-fA-F]+$")]


def _sharing(run: RunDep) -> Sharing:
    if run.sharing is None:
        raise NotFound(
            "not_shared", "this coordinator evaluates the uploads itself ([validation] assign is off)"
        )
    return run.sharing


@router.get("/v1/rounds/{round_}/tasks", responses=responses(404, 422))
async def tasks(round_: RoundNumber, run: RunDep, validator: HexKey = None) -> RoundTasks:
    """A closed round's shared evaluation: its sampled uploads, the validators drawn for each, and (with
    ``validator``) the ones that validator evaluates. ``waiting`` until the round's version is out and the
    draw made: poll again."""
    sharing = _sharing(run)
    row = await asyncio.to_thread(run.store.round, round_)
    if row is None:
        raise NotFound("not_found", f"round {round_} does not exist")
    return await asyncio.to_thread(
        sharing.tasks,
        round_,
        None if validator is None else validator.lower(),
        row.applied_to,
        row.status == "closed" and bool(row.scored),
    )


@router.get("/v1/validators", responses=responses(404))
async def validators(run: RunDep) -> ValidatorRecords:
    """Every named validator's record: its tasks agreed, outvoted and missed, and whether it is benched."""
    sharing = _sharing(run)
    last = await asyncio.to_thread(run.queries.last_closed_round)
    records = await asyncio.to_thread(sharing.records, -1 if last is None else last)
    return ValidatorRecords(validators=records)
