"""Aggregating a round's accepted uploads, streamed one upload at a time.

Each accepted upload comes with its clip scale. By default they are added one at a time into the codec's
accumulator (a running sum and count: memory does not grow with their number) and the mean over the
contributors that selected each coordinate is taken; the robust choices (trimmed mean, median) need every
contributor's values at once instead. A failure while one upload is read or added is that upload's
(``UploadFailed``), so the closer can refuse it and aggregate the rest.

A mean over all contributors never moves a layer further than its longest contribution does; the mean over
those that selected each coordinate can, where they selected different coordinates of one direction (the
output layer at 8 miners, BENCHMARKS.md). ``longest_layers`` and ``clip_layers`` bound it when the
publisher asks (``Publisher.build``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from coordinator.storage.records import Upload
from protocol.codec import Codec, ParamSpec
from protocol.codec.accumulate import RobustMethod, robust_mean
from protocol.codec.measure import Decoded, flatten, layer_norms


class UploadFailed(Exception):
    """Reading or using one upload failed."""

    def __init__(self, miner: str, cause: BaseException) -> None:
        super().__init__(f"upload of miner {miner[:12]} failed: {type(cause).__name__}: {cause}")
        self.miner = miner


def aggregate_uploads(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[Upload], tuple[bytes, bytes]],
    codec: Codec,
    spec: ParamSpec,
    method: RobustMethod | None = None,
    trim_fraction: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The aggregate of ``(upload, scale)`` pairs; ``load(upload)`` gives its (payload, stored form)."""
    if method is not None:
        return _robust(accepted, load, codec, spec, method, trim_fraction)
    acc = codec.accumulator(spec, max_contributors=max(1, len(accepted)))
    for upload, scale in accepted:
        try:
            acc.add_stored(load(upload)[1], scale)
        except Exception as e:
            raise UploadFailed(upload.miner, e) from e
    return acc.mean()


def _robust(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[Upload], tuple[bytes, bytes]],
    codec: Codec,
    spec: ParamSpec,
    method: RobustMethod,
    trim_fraction: float,
) -> dict[str, torch.Tensor]:
    offsets, total = {}, 0
    for name, shape in spec:
        offsets[name], total = total, total + math.prod(shape)
    coords, values = [], []
    for update, scale in decoded_uploads(accepted, load, codec, spec):
        c, v = flatten(update, spec, scale)
        coords.append(c)
        values.append(v)
    flat = robust_mean(
        torch.cat(coords) if coords else torch.zeros(0, dtype=torch.int64),
        torch.cat(values) if values else torch.zeros(0),
        total,
        method,
        trim_fraction,
    )
    return {
        name: flat[o : o + math.prod(shape)].view(shape)
        for (name, shape), o in zip(spec, offsets.values(), strict=True)
    }


def decoded_uploads(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[Upload], tuple[bytes, bytes]],
    codec: Codec,
    spec: ParamSpec,
) -> Iterator[tuple[Decoded, float]]:
    """Each upload decoded from its payload, with its clip scale, one at a time; a failure to read or decode
    one is that upload's (``UploadFailed``)."""
    for upload, scale in accepted:
        try:
            update = codec.decode(load(upload)[0], spec)[1]
        except Exception as e:
            raise UploadFailed(upload.miner, e) from e
        yield update, scale


def longest_layers(updates: Iterable[tuple[Decoded, float]], spec: ParamSpec) -> list[float]:
    """Per parameter (spec order), the largest norm any one update gives it, its clip scale applied."""
    longest = [0.0] * len(spec)
    for update, scale in updates:
        longest = [max(m, scale * n) for m, n in zip(longest, layer_norms(update, spec), strict=True)]
    return longest


def clip_layers(
    aggregate: Mapping[str, torch.Tensor], longest: Sequence[float], spec: ParamSpec
) -> dict[str, torch.Tensor]:
    """The aggregate with each parameter's norm at most its ``longest``. Norms are taken in float64, as in
    ``layer_norms``: a float32 norm of huge values overflows to inf and would scale the layer to
    nothing, hiding what made it huge from the loss guard."""
    out = {}
    for (name, _), most in zip(spec, longest, strict=True):
        t = aggregate[name]
        norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
        out[name] = t * (most / norm) if norm > most else t
    return out
