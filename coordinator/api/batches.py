"""Commits a standby checked, passed on to the leader together (``POST /v1/replicas/commits``).

A standby that checked a direct upload's commit (coordinator/rounds/direct.py) used to pass it on alone: one
request to the leader per upload, whose handling (the HTTP server, the framework, a thread for the store)
was most of what recording an upload cost the leader. Now it passes on together the commits that are
checked while an earlier batch is on its way (``CommitBatcher``): one alone when the leader is idle, many
in one request under a crowd, so a commit waits at most for the batch before it.

Each commit travels as the miner signed it (its path, its signing headers and its body) and the leader
takes each as if it had come alone: the signature, the nonce, the registration and the round rules, with
its own answer (status, body, headers), which the standby gives the miner as the leader's. A batch holds
no authority of its own: anyone may send one, and it gets no more than its commits would have one by one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)
BATCH_PATH = "/v1/replicas/commits"
MAX_COMMITS = 64  # in one batch
IN_FLIGHT = 1  # batches on their way to the leader at once, from one standby
COMMIT_BYTES = 4096  # the most one commit's body takes (as the leader's commit route)
BATCH_BYTES = MAX_COMMITS * 8192  # a batch's body: the commits' bodies, headers and paths
COMMIT_PATH = re.compile(r"^/v1/rounds/(\d{1,16})/commits(?:\?.*)?$")
SIGNING_PREFIX = "x-gradpool-"  # the signing headers (key, timestamp, nonce, signature, content digest)


class PassedCommit(BaseModel):
    """One commit as its miner sent it: the signed path (and query), the signing headers, the body."""

    path: str = Field(max_length=256)
    headers: dict[str, str] = Field(max_length=16)
    body: str = Field(max_length=COMMIT_BYTES)


class CommitBatch(BaseModel):
    commits: list[PassedCommit] = Field(min_length=1, max_length=MAX_COMMITS)


class CommitAnswer(BaseModel):
    """The leader's answer to one commit, as it would have answered it alone: the status, the JSON body
    (as text), the headers its answer carries beyond every answer's."""

    status: int
    body: str
    headers: dict[str, str] = {}


class BatchAnswers(BaseModel):
    answers: list[CommitAnswer]  # in the batch's order


def passed(path: str, headers: dict[str, str], body: bytes) -> PassedCommit:
    """A checked commit as it goes to the leader (its body a commit's: small JSON, so UTF-8)."""
    signing = {k: v for k, v in headers.items() if k.lower().startswith(SIGNING_PREFIX)}
    return PassedCommit(path=path, headers=signing, body=body.decode())


def commit_round(path: str) -> int | None:
    """The round a passed commit's path names; None for a path that is not a commit's."""
    m = COMMIT_PATH.match(path)
    return int(m.group(1)) if m else None


Send = Callable[[list[PassedCommit]], Awaitable[list[CommitAnswer] | None]]


@dataclass
class CommitBatcher:
    """Passes commits on to the leader in batches: each batch holds what was waiting when a batch could go
    (at most ``IN_FLIGHT`` on their way at once). ``send`` posts one batch and gives its answers in order,
    or None where the leader did not take the batch as one (each commit then goes on alone); an error
    (the leader out of reach) is every commit's in the batch. Runs on the event loop."""

    send: Send
    max_commits: int = MAX_COMMITS
    in_flight: int = IN_FLIGHT
    _waiting: list[tuple[PassedCommit, asyncio.Future[CommitAnswer | None]]] = field(
        default_factory=list, init=False
    )
    _going: int = field(default=0, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def pass_on(self, commit: PassedCommit) -> CommitAnswer | None:
        done: asyncio.Future[CommitAnswer | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((commit, done))
        self._start()
        return await done

    def _start(self) -> None:
        while self._waiting and self._going < self.in_flight:
            batch, self._waiting = self._waiting[: self.max_commits], self._waiting[self.max_commits :]
            self._going += 1
            task = asyncio.create_task(self._go(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _go(self, batch: list[tuple[PassedCommit, asyncio.Future[CommitAnswer | None]]]) -> None:
        try:
            answers = await self.send([commit for commit, _ in batch])
            if answers is not None and len(answers) != len(batch):
                log.warning("the leader answered %d of %d commits: each goes alone", len(answers), len(batch))
                answers = None
        except asyncio.CancelledError:  # the standby stops
            for _, done in batch:
                done.cancel()
            raise
        except Exception as e:
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
        else:
            for i, (_, done) in enumerate(batch):
                if not done.done():
                    done.set_result(None if answers is None else answers[i])
        finally:
            self._going -= 1
            self._start()
