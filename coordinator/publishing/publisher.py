"""Making the next version from a round's accepted uploads, guarding it, and writing what is published.

``build_guarded`` builds the next version under the loss guard: ``build`` aggregates, applies the outer
step, compresses what it publishes (``Downlink``) and measures the held-out loss, in memory; a version that
fails ``guard`` is built again without the most suspect uploads until it passes or none is left. The
downlink's error feedback is the coordinator's own bookkeeping, not any miner's work: when the version as
aggregated would fail the guard, the update is compressed again without it, and the aggregate is also tried
with no layer moved further than the longest upload moves it; the best is kept, so neither a stale residual
nor an overshooting aggregate costs a miner its upload at the guard. ``guard`` says whether the result may
be published (every parameter finite, the held-out loss finite and not above the previous version's by more
than ``max_loss_increase``); only then does ``write`` put the published update, the checkpoint and the
coordinator's state (the outer optimizer's momentum, the downlink's error feedback) into the blob store.
Nothing is visible until the closer commits the version, and its state with it.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from safetensors.torch import save as st_save

from coordinator.errors import Stopping
from coordinator.publishing.aggregation import (
    UploadFailed,
    aggregate_uploads,
    clip_layers,
    decoded_uploads,
    longest_layers,
)
from coordinator.publishing.outer import OuterOptimizer
from coordinator.settings import AggregationSettings, PublishSettings
from coordinator.storage.blobs import BlobStore
from coordinator.storage.records import NewVersion, Refusal, Upload
from protocol.codec import Codec, ParamSpec, SparseLoCoCodec
from protocol.codec.counted import CountedCodec
from protocol.params import (
    Params,
    UpdateHeader,
    apply_update,
    compress_update,
    decode_update,
    encode_update,
    frame_update,
    params_hash,
    write_checkpoint,
)
from protocol.payload import framed_bytes

log = logging.getLogger(__name__)


class Downlink:
    """What the coordinator publishes each round. ``exact``: the outer step's delta itself. ``sparseloco``:
    ``u = delta + ef_beta * e``, published as ``P = compress(u)``; the model moves by exactly
    ``decode(P)`` and ``e <- u - decode(P)`` keeps what was not sent for the next rounds, so a download is
    about one upload's size however many miners contributed. ``compress`` keeps the same k values in every
    chunk (``[publish] selection = "chunk"``), or spends the bytes that takes where the aggregate's energy
    is, with a count per chunk (``"global"``, ``protocol/codec/counted.py``)."""

    def __init__(self, settings: PublishSettings, upload: Codec, spec: ParamSpec) -> None:
        self.spec = spec
        kind = settings.format
        if kind == "auto":
            kind = "sparseloco" if upload.name == "sparseloco" else "exact"
        s = settings
        if kind != "sparseloco" and s.budget is not None:
            raise ValueError("[publish] budget sizes the sparseloco format; the exact format has no budget")
        self.compressor: SparseLoCoCodec | None = None  # the same k in every chunk, or its bytes
        self.counted: CountedCodec | None = None
        if kind == "sparseloco":
            k = s.k if s.budget is None else budget_k(s.budget, upload, spec, s.tile, s.bits)
            self.compressor = SparseLoCoCodec(k, s.tile, s.bits)
            if s.selection == "global":
                self.counted = CountedCodec(self.compressor)
        self.beta = s.ef_beta
        self.residual: dict[str, torch.Tensor] = {}

    @property
    def k(self) -> int | None:
        """Values kept per chunk of what is published (None: the exact format)."""
        return None if self.compressor is None else self.compressor.k

    @property
    def carries(self) -> bool:
        """Whether the next step adds a residual (there is one, and it is not decayed to nothing)."""
        return bool(self.residual) and self.beta > 0

    def step(
        self, delta: Mapping[str, torch.Tensor], carry: bool = True
    ) -> tuple[bytes, Params, dict[str, torch.Tensor]]:
        """The update's bytes (without their header), the delta the model moves by, the next residual.
        ``carry=False``: the residual so far is left out of this step (``self.residual`` is not changed;
        ``Publisher.commit`` replaces it), and the next one is what this step leaves out."""
        if self.compressor is None:
            return b"", dict(delta), {}
        residual = self.residual if carry else {}
        u = {n: d + self.beta * residual[n] if n in residual else d.clone() for n, d in delta.items()}
        if self.counted is not None:
            compressed = st_save(self.counted.encode(u, self.spec), metadata={"format": self.counted.name})
        else:
            compressed = compress_update(self.compressor, u, self.spec)
        applied = {n: t.to(u[n].device) for n, t in self._decoded(compressed).items()}
        return compressed, applied, {n: u[n] - applied[n] for n in u}

    def frame(self, compressed: bytes, delta: Mapping[str, torch.Tensor], header: UpdateHeader) -> bytes:
        if self.compressor is None:
            return encode_update(delta, self.spec, header)
        c = self.compressor
        name = "sparseloco" if self.counted is None else self.counted.name
        fields = {"codec": name, "k": c.k, "tile": c.tile, "bits": c.bits}
        return frame_update(compressed, header.model_copy(update=fields))

    def _decoded(self, compressed: bytes) -> Params:
        """Exactly what a miner will decode from the published update."""
        header = UpdateHeader(base_version=0, version=1, param_hash="0" * 64)
        return decode_update(self.frame(compressed, {}, header), self.spec)[1]


def budget_k(budget: float, upload: Codec, spec: ParamSpec, tile: int, bits: int) -> int:
    """The largest k (a multiple of 4) whose published tensors are at most ``budget`` times an upload's.
    Every length in either is fixed by the shapes (``max_payload_bytes``), so this holds for every round;
    the two frames' headers (about 500 bytes each) stand aside."""
    one = _tensor_bytes(upload, spec)
    ks = range(4, tile * tile + 1, 4)
    fits = bisect.bisect_right(
        ks, budget * one, key=lambda k: _tensor_bytes(SparseLoCoCodec(k, tile, bits), spec)
    )
    if fits == 0:
        least = _tensor_bytes(SparseLoCoCodec(4, tile, bits), spec) / one
        raise ValueError(
            f"[publish] budget {budget:g} is below the smallest published update ({least:.2f}, k 4)"
        )
    return ks[fits - 1]


def _tensor_bytes(codec: Codec, spec: ParamSpec) -> int:
    return codec.max_payload_bytes(spec) - framed_bytes(0)


@dataclass
class Built:
    """A version made from a round's accepted updates, not yet written or committed."""

    version: int
    base_version: int
    params: Params
    update: bytes
    param_hash: str
    eval_loss: float
    outer_buffers: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]


@dataclass
class Guarded:
    """What building under the guard gave: the version (None: none passed), the uploads it left out and
    why (``unreadable_upload``, ``loss_guard``), and why there is no version."""

    built: Built | None
    left_out: dict[str, str]
    reason: str | None = None


class Publisher:
    def __init__(
        self,
        codec: Codec,
        spec: ParamSpec,
        blobs: BlobStore,
        outer: OuterOptimizer,
        downlink: Downlink,
        aggregation: AggregationSettings,
        held_out_loss: Callable[[Params], float],
        max_loss_increase: float,
        checkpoint_every: int = 1,
    ) -> None:
        self.codec, self.spec, self.blobs, self.outer, self.downlink = codec, spec, blobs, outer, downlink
        self.aggregation, self.held_out_loss = aggregation, held_out_loss
        self.max_loss_increase, self.checkpoint_every = max_loss_increase, checkpoint_every

    def build_guarded(
        self,
        base: Params,
        head: int,
        version: int,
        accepted: Sequence[tuple[Upload, float]],
        load: Callable[[Upload], tuple[bytes, bytes]],
        most_suspect_first: Callable[[Sequence[Upload]], list[Upload]],
        previous_loss: float | None,
        stop: threading.Event,
    ) -> Guarded:
        """Version ``version`` after ``head`` from the accepted ``(upload, scale)`` pairs, under the guard.
        An upload that fails to load or add is left out and the rest go on; a version that fails the guard
        is built again without the most suspect upload alone (one bad upload is the usual case), then
        without the most suspect half of those left, until it passes or none is left."""
        left_out: dict[str, str] = {}
        tries, reason = 0, None
        while accepted:
            if stop.is_set():
                raise Stopping
            try:
                built = self.build(base, head, version, accepted, load, previous_loss)
            except UploadFailed as e:
                log.warning("version %d: %s; aggregating without it", version, e)
                left_out[e.miner] = Refusal.UNREADABLE
                accepted = [(u, s) for u, s in accepted if u.miner != e.miner]
                continue
            reason = self.guard(built, previous_loss)
            if reason is None:
                return Guarded(built, left_out)
            suspects = most_suspect_first([u for u, _ in accepted])
            tries += 1
            drop = {u.miner for u in suspects[: 1 if tries == 1 else math.ceil(len(suspects) / 2)]}
            log.warning(
                "version %d: %s; building again without %d of %d uploads",
                version,
                reason,
                len(drop),
                len(accepted),
            )
            left_out |= dict.fromkeys(drop, Refusal.LOSS_GUARD)
            accepted = [(u, s) for u, s in accepted if u.miner not in drop]
        return Guarded(None, left_out, None if reason is None else f"{Refusal.LOSS_GUARD}: {reason}")

    def build(
        self,
        base: Params,
        base_version: int,
        version: int,
        accepted: Sequence[tuple[Upload, float]],
        load: Callable[[Upload], tuple[bytes, bytes]],
        previous_loss: float | None = None,
    ) -> Built:
        """The next version from the accepted updates (raises UploadFailed for an upload that fails). With
        ``previous_loss``: when the version would not pass the guard, it is also built without the downlink's
        residual, and (two uploads or more) with no layer moved further than the longest upload moves it
        (``clip_layers``, without the residual), and the one with the lowest loss is kept. A version that
        raises the loss within ``max_loss_increase`` is published as aggregated: its reach pays later."""
        aggregate = self.aggregate(accepted, load)
        delta, outer_buffers = self.outer.step(aggregate)
        built = self.published(base, base_version, version, delta, outer_buffers, carry=True)
        if previous_loss is None or self.guard(built, previous_loss) is None:
            return built
        tried = {"with the downlink's residual": built}
        if self.downlink.carries:
            tried["without it"] = self.published(base, base_version, version, delta, outer_buffers, False)
        if len(accepted) > 1:
            clipped, clipped_buffers = self.stepped(aggregate, accepted, load, clip=True)
            tried["with each layer clipped to the longest upload's"] = self.published(
                base, base_version, version, clipped, clipped_buffers, carry=False
            )
        if len(tried) == 1:
            return built
        best = min(tried, key=lambda t: tried[t].eval_loss if math.isfinite(tried[t].eval_loss) else math.inf)
        log.info(
            "version %d: the held-out loss would be %s (was %.4f): published %s",
            version,
            ", ".join(f"{b.eval_loss:.4f} {t}" for t, b in tried.items()),
            previous_loss,
            best,
        )
        return tried[best]

    def aggregate(
        self, accepted: Sequence[tuple[Upload, float]], load: Callable[[Upload], tuple[bytes, bytes]]
    ) -> dict[str, torch.Tensor]:
        """The accepted updates' aggregate, by ``[aggregation] method``."""
        a = self.aggregation
        method = None if a.method == "mean" else a.method
        return aggregate_uploads(accepted, load, self.codec, self.spec, method, a.trim_fraction)

    def stepped(
        self,
        aggregate: Mapping[str, torch.Tensor],
        accepted: Sequence[tuple[Upload, float]],
        load: Callable[[Upload], tuple[bytes, bytes]],
        clip: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The outer step from ``aggregate`` (pure), with each layer first clipped to the longest accepted
        upload's (``clip_layers``) when ``clip``."""
        if clip:
            longest = longest_layers(decoded_uploads(accepted, load, self.codec, self.spec), self.spec)
            aggregate = clip_layers(aggregate, longest, self.spec)
        return self.outer.step(aggregate)

    def step(
        self, accepted: Sequence[tuple[Upload, float]], load: Callable[[Upload], tuple[bytes, bytes]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The outer step's delta from the accepted updates, and the outer momentum after it (pure)."""
        return self.outer.step(self.aggregate(accepted, load))

    def published(
        self,
        base: Params,
        base_version: int,
        version: int,
        delta: Mapping[str, torch.Tensor],
        outer_buffers: dict[str, torch.Tensor],
        carry: bool,
    ) -> Built:
        """The version that moves ``base`` by ``delta`` as the downlink publishes it, with or without the
        residual carried from earlier versions, and its held-out loss."""
        compressed, applied, residual = self.downlink.step(delta, carry)
        params = {n: p.clone() for n, p in base.items()}
        apply_update(params, applied)
        param_hash = params_hash(params, self.spec)
        header = UpdateHeader(base_version=base_version, version=version, param_hash=param_hash)
        update = self.downlink.frame(compressed, applied, header)
        return Built(
            version,
            base_version,
            params,
            update,
            param_hash,
            self.held_out_loss(params),
            outer_buffers,
            residual,
        )

    def guard(self, built: Built, previous_loss: float | None) -> str | None:
        """Why ``built`` must not be published, or None."""
        bad = next((n for n, p in built.params.items() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            return f"parameter {bad} is not finite"
        if not math.isfinite(built.eval_loss):
            return "the held-out loss is not finite"
        if previous_loss is not None and built.eval_loss > previous_loss * (1 + self.max_loss_increase):
            return (
                f"the held-out loss would rise from {previous_loss:.4f} to {built.eval_loss:.4f}, "
                f"more than {100 * self.max_loss_increase:g} %"
            )
        return None

    def write(self, built: Built) -> NewVersion:
        """The published update, the checkpoint (every ``checkpoint_every`` versions) and the coordinator's
        state (every version: resuming exactly needs it), as content-addressed blobs (an orphan at worst, if
        the commit never comes)."""
        meta = {"version": str(built.version), "param_hash": built.param_hash}
        written = self.blobs.put_written  # each file streamed from the tensors, never whole in memory
        checkpoint_sha, checkpoint_bytes = (
            written(partial(write_checkpoint, built.params, meta))
            if built.version % self.checkpoint_every == 0
            else (None, 0)
        )
        state = state_tensors(built.outer_buffers, built.residual)
        return NewVersion(
            version=built.version,
            base_version=built.base_version,
            param_hash=built.param_hash,
            eval_loss=built.eval_loss,
            update_sha=self.blobs.put(built.update),
            update_bytes=len(built.update),
            checkpoint_sha=checkpoint_sha,
            checkpoint_bytes=checkpoint_bytes,
            state_sha=written(partial(write_checkpoint, state, {}))[0] if state else None,
        )

    def commit(self, built: Built) -> None:
        """The built version's state is now the coordinator's (called once the version is committed)."""
        self.outer.buffers = built.outer_buffers
        self.downlink.residual = built.residual

    def reset(self) -> None:
        """Back to the state of version 0: no outer momentum, no downlink residual (a run replayed)."""
        self.outer.buffers, self.downlink.residual = {}, {}

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """The state saved with a version (``state_tensors``, written as a checkpoint), as the coordinator
        resumes from it."""
        outer, residual = load_state(state)
        self.outer.load_state_dict(outer)
        self.downlink.residual = residual


def state_tensors(
    outer: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The coordinator's state saved with a version (outer momentum, downlink residual), as named tensors."""
    tensors = {f"outer/{n}": t for n, t in outer.items()}
    return tensors | {f"downlink/{n}": t for n, t in residual.items()}


def load_state(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(outer momentum, downlink residual); a state from before the downlink held the momentum alone."""
    if not any(k.startswith(("outer/", "downlink/")) for k in tensors):
        return dict(tensors), {}
    outer = {k.removeprefix("outer/"): t for k, t in tensors.items() if k.startswith("outer/")}
    return outer, {k.removeprefix("downlink/"): t for k, t in tensors.items() if k.startswith("downlink/")}
