"""What the coordinator may publish after one round of given payloads, computed here from the payloads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from coordinator.publishing.aggregation import clip_layers, longest_layers
from protocol.codec import SparseLoCoCodec
from protocol.codec.accumulate import aggregate
from protocol.codec.measure import Decoded, clip_scale, clip_scales, update_norm
from protocol.params import Params, apply_update, params_hash
from tests.helpers.pool import SPEC


def after_round(params: Params, bodies: Sequence[bytes], reference: float | None = None) -> list[Params]:
    """What publishing one round of exactly these payloads may make of ``params`` (outer SGD at lr 1, exact
    downlink), each payload clipped to ``reference`` (None: their median norm): ``versions`` of their
    aggregate."""
    codec = SparseLoCoCodec()
    decoded = [codec.decode(b, SPEC)[1] for b in bodies]
    norms = [update_norm(d) for d in decoded]
    scales = clip_scales(norms) if reference is None else [clip_scale(n, reference) for n in norms]
    return versions(params, aggregate(decoded, SPEC, reference=reference), decoded, scales)


def versions(
    params: Params, delta: Mapping[str, torch.Tensor], decoded: Sequence[Decoded], scales: Sequence[float]
) -> list[Params]:
    """``params`` moved by ``delta``, the aggregate of these decoded payloads at these clip scales, or,
    where that would fail the loss guard, by the same with each layer clipped to the longest payload's
    (``Publisher.build``)."""
    longest = longest_layers(zip(decoded, scales, strict=True), SPEC)
    out = []
    for step in (delta, clip_layers(delta, longest, SPEC)):
        moved = {n: t.clone() for n, t in params.items()}
        apply_update(moved, step)
        out.append(moved)
    return out


def one_of(candidates: Sequence[Params], param_hash: str) -> Params:
    """The candidate whose parameter hash is ``param_hash``; fails the test when none is."""
    found = [p for p in candidates if params_hash(p, SPEC) == param_hash]
    assert found, f"{param_hash[:12]} is none of the {len(candidates)} versions these payloads may make"
    return found[0]


def hashes(candidates: Sequence[Params]) -> set[str]:
    return {params_hash(p, SPEC) for p in candidates}
