"""Round modes are one class each: a third mode, written here in a few lines, runs a network's rounds
without a change to judging or the closer. The closer is driven directly (no HTTP), on a clock the test
moves."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch

from coordinator.rounds.modes import Synchronous
from coordinator.rounds.state import RoundState
from coordinator.run import Run
from coordinator.settings import CoordinatorSettings
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, SparseLoCoCodec
from protocol.signing import generate_key, public_key_hex
from tests.helpers.clock import ManualClock
from tests.helpers.waiting import wait_until


class EveryFewSeconds(Synchronous):
    """Close each round a fixed time after it opened, with whatever uploads it has by then."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s

    def due(self, state: RoundState, now: float, min_quorum: int) -> bool:
        return state.status == "open" and bool(state.uploaded) and now >= state.clock_from + self.every_s

    def wake_in(self, state: RoundState, now: float) -> float | None:
        return max(0.0, state.clock_from + self.every_s - now)


def upload(run: Run, seed: int) -> bytes:
    state = run.cell.state
    g = torch.Generator().manual_seed(seed)
    delta = {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in run.spec}
    header = PayloadHeader(
        format_version=PAYLOAD_FORMAT_VERSION,
        codec="sparseloco",
        round=state.round,
        base_version=state.version,
    )
    return SparseLoCoCodec().encode(delta, run.spec, header)[0]


def test_a_mode_that_closes_rounds_by_the_clock_runs_two_rounds(
    make_settings: Callable[..., CoordinatorSettings],
) -> None:
    # a quorum of 3 that one miner never meets and a deadline far away: only the mode can close a round
    # (random deltas are no training: evaluation is off, so that each round publishes its one upload)
    settings = make_settings(
        rounds={"min_quorum": 3, "deadline_s": 600.0, "overlap": False}, validation={"builtin": False}
    )
    clock = ManualClock()
    run = Run(settings, clock=clock, mode=EveryFewSeconds(every_s=5.0))
    run.start()
    try:
        miner = public_key_hex(generate_key())
        run.intake.register(miner)
        for r in range(2):
            body = upload(run, seed=r)
            run.intake.submit(miner, r, body, hashlib.sha256(body).hexdigest())
            clock.advance(4.0)
            time.sleep(0.2)  # the closer had its chance: not due yet
            assert run.cell.state.round == r and run.cell.state.status == "open"
            clock.advance(1.0)
            wait_until(lambda r=r: run.cell.state.round == r + 1, 60.0, f"round {r} to close")
        assert run.store.latest_version() == 2
        assert [u.status for r in range(2) for u in run.store.round_uploads(r)] == ["accepted", "accepted"]
    finally:
        run.close()


def test_the_same_network_in_the_default_mode_would_not_close() -> None:
    state = RoundState(0, 0, "0" * 64, uploaded=frozenset({"a"}), first_upload_at=0.0, deadline_s=600.0)
    assert not Synchronous().due(state, now=5.0, min_quorum=3)
    assert EveryFewSeconds(5.0).due(state, now=5.0, min_quorum=3)
