"""Commits a standby checked, passed on to the leader together (``POST /v1/replicas/commits``).

A standby that checked a direct upload's commit (coordinator/rounds/direct.py) used to pass it on alone: one
request to the leader per upload, whose handling (the HTTP server, the framework, a thread for the store)
was most of what recording an upload cost the leader. Now it passes on together the commits that are
checked while an earlier batch is on its way (``CommitBatcher``): one alone when the leader is idle, many
in one request under a crowd, so a commit waits at most for the batch before it (or ``STALL_S``, if the
leader has stopped answering).

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
STALL_S = 1.0  # how long the last batch sent holds the next back, if the leader has not answered it
MOST_IN_FLIGHT = 8  # batches on their way to the leader at once, from one standby
BATCH_TIMEOUT_S = 30.0  # a batch the leader has not answered by then: each commit in it answered 503
COMMIT_BYTES = 4096  # the most a form's or a commit's body takes (the leader's routes refuse more)
BATCH_BYTES = MAX_COMMITS * 8192  # a batch's body: the commits' bodies, headers and paths
COMMIT_PATH = re.compile(r"/v1/rounds/([0-9]{1,20})/commits(?:\?.*)?", re.ASCII)
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
    m = COMMIT_PATH.fullmatch(path)
    return int(m.group(1)) if m else None


Send = Callable[[list[PassedCommit]], Awaitable[list[CommitAnswer] | None]]


class Unanswered(Exception):
    """The leader is not known, did not answer a batch, or answered it as no leader would (the message
    says which): each commit in it is answered 503, and its miner tries again."""


Waiting = tuple[PassedCommit, "asyncio.Future[CommitAnswer | None]"]


@dataclass
class CommitBatcher:
    """Passes commits on to the leader in batches: each batch holds what was waiting when a batch could go,
    which is when none is on its way, or when the last one sent has been out ``stall_s`` (a leader that
    stopped answering holds the others back no longer than that; at most ``most_in_flight`` on their way).
    ``send`` posts one batch and gives its answers in order, or None where the leader did not take the
    batch as one (each commit then goes on alone); an error is every commit's in the batch. Runs on the
    event loop."""

    send: Send
    max_commits: int = MAX_COMMITS
    most_in_flight: int = MOST_IN_FLIGHT
    stall_s: float = STALL_S
    _waiting: list[Waiting] = field(default_factory=list, init=False)
    _sent: list[float] = field(default_factory=list, init=False)  # when each batch on its way went
    _wake: asyncio.TimerHandle | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def pass_on(self, commit: PassedCommit) -> CommitAnswer | None:
        done: asyncio.Future[CommitAnswer | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((commit, done))
        self._start()
        return await done

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting and len(self._sent) < self.most_in_flight:
            if self._sent and (due := max(self._sent) + self.stall_s) > loop.time():
                if self._wake is None:  # the next may go when the last one sent has been out stall_s
                    self._wake = loop.call_at(due, self._woken)
                return
            batch, self._waiting = self._waiting[: self.max_commits], self._waiting[self.max_commits :]
            sent = loop.time()
            self._sent.append(sent)
            task = asyncio.create_task(self._go(batch, sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _woken(self) -> None:
        self._wake = None
        self._start()

    async def _go(self, batch: list[Waiting], sent: float) -> None:
        try:
            answers = await self.send([commit for commit, _ in batch])
            if answers is not None and len(answers) != len(batch):
                raise Unanswered(f"the leader answered {len(answers)} of {len(batch)} commits")
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
            self._sent.remove(sent)
            self._start()
