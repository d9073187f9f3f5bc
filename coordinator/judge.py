"""The checks at aggregation, and the aggregation itself, streamed one upload at a time.

Each upload was decoded at intake, which recorded its norm and a sketch of it; judging needs only those:
copies (the same update, or one whose sketch is nearly parallel to an earlier one: the later uploader is
refused), empty and non-finite updates, and norm outliers. The accepted uploads are then decoded one at a
time into a running sum and count, so memory does not grow with their number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protocol.aggregate import Accumulator, cosine, sketch, sketch_flat, update_norm
from protocol.codec import Codec, ParamSpec, PayloadHeader, SparseLoCoCodec, content_digest
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
        elif any(
            u.content_sha256 == k.content_sha256 or cosine(u.sketch, k.sketch) > COPY_COSINE for k in kept
        ):
            verdicts[u.miner] = "copied_payload"
        else:
            kept.append(u)
    if len(kept) >= 3:
        median = statistics.median(u.norm for u in kept)
        for u in kept:
            if u.norm > max_norm_ratio * median:
                verdicts[u.miner] = "norm_outlier"
    accepted = [u for u in kept if u.miner not in verdicts]
    median = statistics.median(u.norm for u in accepted) if accepted else 0.0
    for u in accepted:
        verdicts[u.miner] = None
    return verdicts, [(u, min(1.0, median / u.norm)) for u in accepted]


def aggregate_uploads(
    accepted: Sequence[tuple[Upload, float]],
    load: Callable[[str], bytes],
    codec: Codec,
    spec: ParamSpec,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The aggregate of the accepted uploads, decoding one at a time into a running sum and count (for
    SparseLoCo in the codec's chunk layout, where adding a payload is a sequential pass)."""
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
