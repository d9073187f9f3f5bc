"""What judging found of a round's uploads (rounds/judging.py makes it): the judgement the version is built
on, and the part of a round's evaluation left for after its version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.rounds.checks import History
from coordinator.storage.records import Upload
from protocol.evaluation import Losses
from protocol.pairing import RoundEvaluation


@dataclass
class Later:
    """Overlapped rounds: the part of a round's evaluation left for after its version is published."""

    round: int
    evaluation: RoundEvaluation
    uploads: list[Upload]  # to measure then
    scales: dict[str, float]
    history: History
    probation: frozenset[str] = frozenset()  # left out of the version, evaluated all the same
    salt: str = ""  # the round's


@dataclass
class Judgement:
    """What judging found of a round's uploads. Only judging writes it; what building the version leaves
    out is the publisher's answer, kept apart."""

    refused: dict[str, str]  # miner -> reason
    scales: dict[str, float]  # each clip scale to the reference norm
    losses: dict[str, Losses]  # the evaluation (or the gate) of the uploads it reached
    evaluated: set[str]  # the sampled uploads (validators evaluate exactly these)
    reference_norm: float | None
    weights: dict[str, float] = field(default_factory=dict)  # weight_by_score: mean 1; none: all 1
    later: Later | None = None  # overlapped rounds: the evaluation after the version

    def accepted(self, uploads: Sequence[Upload]) -> list[tuple[Upload, float]]:
        """The uploads judging left, each with its scale in the aggregate (clip times weight)."""
        return [
            (u, self.scales[u.miner] * self.weights.get(u.miner, 1.0))
            for u in uploads
            if u.miner not in self.refused
        ]
