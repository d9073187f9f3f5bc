"""The checks at aggregation, and the aggregation itself, streamed one upload at a time.

Each upload was decoded at intake, which recorded its norm and a sketch of it; the cheap checks need only
those: copies (the same update, or one whose sketch is nearly parallel to an earlier one: the later
uploader is refused), empty and non-finite updates, and norm outliers. The evaluation (the loss before and
after each update, protocol/evaluation.py) then refuses harmful and useless updates. The accepted uploads
are decoded one at a time into a running sum and count, so memory does not grow with their number; the
robust choices (trimmed mean, median) need every contributor's values at once instead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protocol.aggregate import (
    Accumulator,
    RobustMethod,
    clip_scales,
    cosine,
    flatten,
    robust_mean,
    sketch,
    sketch_flat,
    update_norm,
)
from protocol.codec import Codec, ParamSpec, PayloadHeader, SparseLoCoCodec, content_digest
from protocol.evaluation import Losses
from protocol.sparseloco import ChunkAccumulator

MAX_NORM_RATIO = 10.0  # refuse an update whose norm exceeds this multiple of the median (3+ uploads)
COPY_COSINE = 0.98  # an update this parallel to an earlier one is a copy, rescaled or not


@dataclass(frozen=True)
class Upload:
    miner: str
    sha256: str
    content_sha256: str
    norm: float
    sketch: torch.Tensor
    unpacked_sha256: str | None = None  # SparseLoCo: the payload re-framed for cheap accumulation


@dataclass(frozen=True)
class Examined:
    """What intake learns from a payload once, so that closing the round need not decode it again."""

    header: PayloadHeader
    content_sha256: str
    norm: float
    sketch: torch.Tensor
    unpacked: bytes | None


def examine(body: bytes, codec: Codec, spec: ParamSpec) -> Examined:
    """Decode and check a payload (raises CodecError); its norm, sketch, and for SparseLoCo its unpacked
    form."""
    if isinstance(codec, SparseLoCoCodec):
        header, coords, values, unpacked = codec.examine(body, spec)
        norm = float(values.double().square().sum().sqrt())
        return Examined(header, content_digest(body), norm, sketch_flat(coords, values), unpacked)
    header, update = codec.decode(body, spec)
    return Examined(header, content_digest(body), update_norm(update), sketch(update, spec), None)


def is_copy(later: Upload, earlier: Upload, copy_cosine: float = COPY_COSINE) -> bool:
    return (
        later.content_sha256 == earlier.content_sha256 or cosine(later.sketch, earlier.sketch) > copy_cosine
    )


def judge(
    uploads: Sequence[Upload], max_norm_ratio: float = MAX_NORM_RATIO, copy_cosine: float = COPY_COSINE
) -> tuple[dict[str, str | None], list[tuple[Upload, float]]]:
    """Each upload's verdict (None: accepted, else the reason) and the accepted uploads in arrival order,
    each with its clip scale min(1, median norm / own norm)."""
    verdicts: dict[str, str | None] = {}
    kept: list[Upload] = []
    for u in uploads:
        if not math.isfinite(u.norm):
            verdicts[u.miner] = "non_finite"
        elif u.norm == 0.0:
            verdicts[u.miner] = "empty_update"
        elif any(is_copy(u, k, copy_cosine) for k in kept):
            verdicts[u.miner] = "copied_payload"
        else:
            kept.append(u)
    if len(kept) >= 3:
        median = statistics.median(u.norm for u in kept)
        for u in kept:
            if u.norm > max_norm_ratio * median:
                verdicts[u.miner] = "norm_outlier"
    accepted = [u for u in kept if u.miner not in verdicts]
    for u in accepted:
        verdicts[u.miner] = None
    return verdicts, reclip(accepted)


def refuse_by_evaluation(
    verdicts: dict[str, str | None],
    accepted: Sequence[tuple[Upload, float]],
    losses: dict[str, Losses],
    refuse_harmful: bool = True,
    min_gain_fraction: float = 0.0,
) -> list[tuple[Upload, float]]:
    """Refuse (in ``verdicts``) the evaluated updates that do not lower the loss on their own data
    ("harmful") or lower it by less than ``min_gain_fraction`` of the round's median gain ("low_gain",
    with 3+ evaluated updates); the rest are clipped again to their own median norm."""
    gains = {u.miner: losses[u.miner].gain for u, _ in accepted if u.miner in losses}
    for miner, gain in gains.items():
        if refuse_harmful and (not losses[miner].finite() or gain <= 0):
            verdicts[miner] = "harmful"
    useful = [g for m, g in gains.items() if verdicts.get(m) is None and math.isfinite(g)]
    if min_gain_fraction > 0 and len(useful) >= 3 and (median := statistics.median(useful)) > 0:
        for miner, gain in gains.items():
            if verdicts.get(miner) is None and gain < min_gain_fraction * median:
                verdicts[miner] = "low_gain"
    return reclip([u for u, _ in accepted if verdicts.get(u.miner) is None])


def reclip(uploads: Sequence[Upload]) -> list[tuple[Upload, float]]:
    return list(zip(uploads, clip_scales([u.norm for u in uploads]), strict=True))


def aggregate_uploads(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[str], bytes],
    codec: Codec,
    spec: ParamSpec,
    device: torch.device | str = "cpu",
    method: RobustMethod | None = None,
    trim_fraction: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The aggregate of the accepted uploads: by default the mean over the contributors that selected each
    coordinate, decoding one at a time into a running sum and count (for SparseLoCo in the codec's chunk
    layout, where adding a payload is a sequential pass); or a robust ``method`` over all of them."""
    if method is not None:
        return _robust(accepted, load, codec, spec, device, method, trim_fraction)
    if isinstance(codec, SparseLoCoCodec) and len(accepted) <= 255:
        chunks = ChunkAccumulator(codec, spec)
        for upload, scale in accepted:
            if upload.unpacked_sha256 is not None:
                chunks.add_unpacked(load(upload.unpacked_sha256), scale)
            else:
                chunks.add(load(upload.sha256), scale)
        return chunks.mean()
    acc = Accumulator(spec, device, max_contributors=len(accepted))
    for upload, scale in accepted:
        acc.add(codec.decode(load(upload.sha256), spec)[1], scale)
    return acc.mean()


def _robust(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[str], bytes],
    codec: Codec,
    spec: ParamSpec,
    device: torch.device | str,
    method: RobustMethod,
    trim_fraction: float,
) -> dict[str, torch.Tensor]:
    offsets, total = {}, 0
    for name, shape in spec:
        offsets[name], total = total, total + math.prod(shape)
    coords, values = [], []
    for upload, scale in accepted:
        c, v = flatten(codec.decode(load(upload.sha256), spec)[1], spec, scale)
        coords.append(c)
        values.append(v)
    flat = robust_mean(
        torch.cat(coords) if coords else torch.zeros(0, dtype=torch.int64),
        torch.cat(values) if values else torch.zeros(0),
        total, method, trim_fraction,
    ).to(device)  # fmt: skip
    return {name: flat[o : o + math.prod(shape)].view(shape) for (name, shape), o in
            zip(spec, offsets.values(), strict=True)}  # fmt: skip
