"""Round modes: when a round closes, what a round opens on, and when its uploads are judged. The closer
(rounds/closer.py) asks its mode and never tests which one it has; a new mode is one class here.

- ``Synchronous``: the round closes once its expected miners are in (or its deadline passed after a
  quorum); the next round opens when the version is committed, for that version; every sampled upload is
  evaluated before the version is built.
- ``Overlapped`` (the default, ``[rounds] overlap``): the next round opens as this one starts closing, for
  the version current then, so miners train it while this one is judged and published; its uploads are
  judged against and applied to the version this round publishes. Closing stays one round at a time, so an
  upload is applied at most one version after the one it trained from (``max_staleness = 1``), and every
  check sees the exact model the upload will change. Uploads of miners with a good standing go into the
  version on the cheap checks and are evaluated once it is published.

- ``SharedSynchronous``: synchronous rounds whose evaluation is shared among validators (``[validation]
  assign``): they close and open as synchronous ones, and are judged as overlapped ones are, around their
  version, since the validators evaluate once it is out (rounds/sharing.py).
"""

from __future__ import annotations

from typing import Protocol

from coordinator.rounds.judgement import Judgement
from coordinator.rounds.judging import Judge
from coordinator.rounds.opening import RoundOpener
from coordinator.rounds.state import RoundState
from coordinator.storage.records import Upload


class RoundMode(Protocol):
    def due(self, state: RoundState, now: float, min_quorum: int) -> bool:
        """Whether the open round should close now."""
        ...

    def wake_in(self, state: RoundState, now: float) -> float | None:
        """Seconds until ``due`` may turn true with no new upload (None: only an upload can)."""
        ...

    def begin(self, opener: RoundOpener) -> RoundState:
        """The round to close, marked closing (and the next round opened, where the mode overlaps them)."""
        ...

    def judge(self, judge: Judge, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        """The judgement of the round's uploads before its version is built."""
        ...


class Synchronous:
    def due(self, state: RoundState, now: float, min_quorum: int) -> bool:
        return state.ready(now, min_quorum)

    def wake_in(self, state: RoundState, now: float) -> float | None:
        return state.time_left(now)

    def begin(self, opener: RoundOpener) -> RoundState:
        return opener.closing()

    def judge(self, judge: Judge, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        return judge.before_version(round_, uploads, salt)


class Overlapped(Synchronous):
    def begin(self, opener: RoundOpener) -> RoundState:
        return opener.closing_with_next()

    def judge(self, judge: Judge, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        return judge.around_version(round_, uploads, salt)


class SharedSynchronous(Synchronous):
    def judge(self, judge: Judge, round_: int, uploads: list[Upload], salt: str) -> Judgement:
        return judge.around_version(round_, uploads, salt)


def mode_for(overlap: bool, shared: bool = False) -> RoundMode:
    """The mode ``[rounds] overlap`` names (``shared``: ``[validation] assign``)."""
    if overlap:
        return Overlapped()
    return SharedSynchronous() if shared else Synchronous()
