"""What the coordinator's parts (intake, the closer, the queries) share: built once by ``Run``, each used
through the few methods its part needs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.metrics import Metrics
from coordinator.publishing.outer import OuterOptimizer
from coordinator.publishing.publisher import Publisher
from coordinator.rounds.scoring import Scores
from coordinator.rounds.state import RoundCell
from coordinator.storage.blobs import BlobStore
from coordinator.storage.store import Store
from protocol.codec import Codec, ParamSpec
from protocol.data import Dataset
from protocol.model import CausalLM, evaluate_loss
from protocol.params import Params, set_params
from protocol.wire import RunInfo


class Model:
    """The coordinator's copy of the model: the current version's parameters (the closer replaces them
    when it publishes) and the held-out set every version is measured on. Only the closer uses it once the
    run has started."""

    def __init__(self, module: CausalLM, params: Params, held_out: torch.Tensor) -> None:
        self.module, self.params, self.held_out = module, params, held_out

    def held_out_loss(self, params: Params) -> float:
        set_params(self.module, params)
        return evaluate_loss(self.module, self.held_out)


class Downloads:
    """Bytes served during the open round, counted in memory (the event loop must not write SQLite per
    download) and committed with the round: ``model`` (published updates, checkpoints, uploads served to
    validators) and ``data`` (training sequences)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {"model": 0, "data": 0}

    def add(self, n: int, kind: str = "model") -> None:
        with self._lock:
            self._bytes[kind] += n

    def take(self) -> tuple[int, int]:
        """(model, data) bytes since the last take."""
        with self._lock:
            taken, self._bytes = self._bytes, {"model": 0, "data": 0}
            return taken["model"], taken["data"]


@dataclass(frozen=True)
class Parts:
    store: Store
    blobs: BlobStore
    cell: RoundCell
    codec: Codec
    spec: ParamSpec
    info: RunInfo
    dataset: Dataset
    publisher: Publisher
    outer: OuterOptimizer
    scores: Scores
    metrics: Metrics
    downloads: Downloads
    clock: Callable[[], float]
