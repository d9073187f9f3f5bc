"""Making the next version from a round's accepted uploads, guarding it, and writing what is published.

``build`` aggregates, applies the outer step and measures the held-out loss, in memory; ``guard`` says
whether the result may be published (every parameter finite, the held-out loss finite and not above the
previous version's by more than ``max_loss_increase``); only then does ``write`` put the published update,
the checkpoint and the outer optimizer's state into the blob store. Nothing is visible until the closer
commits the version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from coordinator.aggregation import aggregate_uploads
from coordinator.blobs import BlobStore
from coordinator.checks import Upload
from coordinator.outer import OuterOptimizer
from coordinator.settings import AggregationSettings
from coordinator.store import NewVersion
from protocol.codec import Codec, ParamSpec
from protocol.params import Params, UpdateHeader, apply_update, encode_update, params_hash, save_checkpoint


@dataclass
class Built:
    """A version made from a round's accepted updates, not yet written or committed."""

    version: int
    base_version: int
    params: Params
    delta: dict[str, torch.Tensor]
    param_hash: str
    eval_loss: float
    outer_buffers: dict[str, torch.Tensor]


class Publisher:
    def __init__(
        self,
        codec: Codec,
        spec: ParamSpec,
        blobs: BlobStore,
        outer: OuterOptimizer,
        aggregation: AggregationSettings,
        held_out_loss: Callable[[Params], float],
        max_loss_increase: float,
    ) -> None:
        self.codec, self.spec, self.blobs, self.outer = codec, spec, blobs, outer
        self.aggregation, self.held_out_loss = aggregation, held_out_loss
        self.max_loss_increase = max_loss_increase

    def build(
        self,
        base: Params,
        base_version: int,
        version: int,
        accepted: Sequence[tuple[Upload, float]],
        load: Callable[[Upload], tuple[bytes, bytes]],
    ) -> Built:
        """The next version from the accepted updates (raises UploadFailed for an upload that fails)."""
        a = self.aggregation
        method = None if a.method == "mean" else a.method
        aggregate = aggregate_uploads(accepted, load, self.codec, self.spec, method, a.trim_fraction)
        delta, outer_buffers = self.outer.step(aggregate)
        params = {n: p.clone() for n, p in base.items()}
        apply_update(params, delta)
        return Built(version, base_version, params, delta, params_hash(params, self.spec),
                     self.held_out_loss(params), outer_buffers)  # fmt: skip

    def guard(self, built: Built, previous_loss: float | None) -> str | None:
        """Why ``built`` must not be published, or None."""
        bad = next((n for n, p in built.params.items() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            return f"parameter {bad} is not finite"
        if not math.isfinite(built.eval_loss):
            return "the held-out loss is not finite"
        if previous_loss is not None and built.eval_loss > previous_loss * (1 + self.max_loss_increase):
            return (f"the held-out loss would rise from {previous_loss:.4f} to {built.eval_loss:.4f}, "
                    f"more than {100 * self.max_loss_increase:g} %")  # fmt: skip
        return None

    def write(self, built: Built) -> NewVersion:
        """The published update, the checkpoint and the outer optimizer's state, as content-addressed blobs
        (an orphan at worst, if the commit never comes)."""
        header = UpdateHeader(
            base_version=built.base_version, version=built.version, param_hash=built.param_hash
        )
        update = encode_update(built.delta, self.spec, header)
        ckpt = save_checkpoint(built.params, {"version": str(built.version), "param_hash": built.param_hash})
        state = save_checkpoint(built.outer_buffers, {}) if built.outer_buffers else None
        return NewVersion(
            version=built.version, base_version=built.base_version, param_hash=built.param_hash,
            eval_loss=built.eval_loss, update_sha=self.blobs.put(update), update_bytes=len(update),
            checkpoint_sha=self.blobs.put(ckpt), checkpoint_bytes=len(ckpt),
            state_sha=None if state is None else self.blobs.put(state),
        )  # fmt: skip
