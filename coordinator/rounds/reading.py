"""What judging reads: a round's uploads from the blob store, and the evaluation of a round on the
coordinator's model and data."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.hooks import Hooks
from coordinator.publishing.model import Model
from coordinator.storage.blobs import BlobStore
from coordinator.storage.records import Upload
from protocol.codec import Codec, ParamSpec
from protocol.data import Dataset
from protocol.pairing import RoundEvaluation
from protocol.params import Params
from protocol.wire import RunInfo


class UploadReader:
    """A round's uploads read back from the blob store as judging and building the version read them
    (``Hooks.on_upload`` first: a test's failure injection)."""

    def __init__(self, blobs: BlobStore, hooks: Hooks, codec: Codec, spec: ParamSpec) -> None:
        self.blobs, self.hooks, self.codec, self.spec = blobs, hooks, codec, spec

    def payload(self, round_: int, u: Upload) -> bytes:
        if self.hooks.on_upload is not None:
            self.hooks.on_upload(round_, u.miner)
        return self.blobs.get(u.sha256)

    def both(self, round_: int, u: Upload) -> tuple[bytes, bytes]:
        """The payload and the form the codec's accumulator reads: the payload itself, the form intake
        kept, or, where intake kept none (``IntakeSettings.keep_unpacked``), the payload unpacked again."""
        payload = self.payload(round_, u)
        if u.stored_sha256 == u.sha256:
            return payload, payload
        if u.stored_sha256 is None:
            return payload, self.codec.unpack(payload, self.spec)
        return payload, self.blobs.get(u.stored_sha256)


class Evaluations:
    """Makes a round's evaluation: the coordinator's model and data, and what the run announced."""

    def __init__(self, model: Model, dataset: Dataset, info: RunInfo) -> None:
        self.model, self.dataset, self.info = model, dataset, info

    def of(
        self, round_: int, salt: str, uploads: Sequence[Upload], base: Params | None = None
    ) -> RoundEvaluation:
        """On ``base`` (None: the current version)."""
        params = self.model.params if base is None else base
        evaluator = self.model.evaluator(params, self.dataset.sequences)
        return RoundEvaluation(evaluator, self.info, round_, salt, [u.miner for u in uploads])
