"""The wire of an evaluation shared among validators (``[validation] assign``): a round's tasks, as
``GET /v1/rounds/{round}/tasks`` gives them, and each validator's record (``GET /v1/validators``). The
draw and the settling are the coordinator's (coordinator/rounds/sharing.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.wire import Wire


class Task(Wire):
    """One sampled upload of a round whose evaluation is shared, and the validators drawn to evaluate it."""

    miner: str
    sha256: str = Field(description="the upload's sha256: GET /v1/rounds/{round}/payloads/{miner}")
    scale: float = Field(description="its clip scale: it is evaluated applied at this scale")
    validators: list[str] = Field(description="the validators assigned to it, in the draw's order")


class RoundTasks(Wire):
    """A closed round's shared evaluation: every sampled upload (a validator decodes them all into the
    round's mean update) and which of them the asking validator evaluates."""

    round: int
    status: Literal["waiting", "assigned", "settled"] = Field(
        description="waiting: not drawn yet (the round or its version is not out; poll again); assigned: "
        "verdicts are taken until `deadline`; settled: the round's verdicts are decided, no more are taken"
    )
    version: int | None = Field(default=None, description="the version the uploads are evaluated on")
    salt: str | None = Field(default=None, description="the round's salt: the samples' draw")
    deadline: float | None = Field(default=None, description="unix time: verdicts after it are not taken")
    uploads: list[Task] = Field(default_factory=list)
    assigned: list[str] = Field(
        default_factory=list, description="the miners whose uploads the asking `validator` evaluates"
    )


class ValidatorRecord(Wire):
    """What became of a validator's assigned evaluations."""

    validator: str
    assigned: int = Field(description="uploads assigned to it, settled")
    agreed: int = Field(description="its verdict stood with the others' (within the tolerance)")
    outvoted: int = Field(description="its verdict disagreed, and the deciding evaluation was against it")
    missed: int = Field(description="no verdict by the deadline")
    last_round: int | None
    benched: bool = Field(description="not assigned now: outvoted or missing too often lately")


class ValidatorRecords(Wire):
    validators: list[ValidatorRecord]
