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

from protocol.aggregate import Accumulator, cosine
from protocol.codec import Codec, ParamSpec, SparseLoCoCodec
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


def is_copy(later: Upload, earlier: Upload) -> bool:
    return (
        later.content_sha256 == earlier.content_sha256 or cosine(later.sketch, earlier.sketch) > COPY_COSINE
    )


def judge(uploads: Sequence[Upload]) -> tuple[dict[str, str | None], list[tuple[Upload, float]]]:
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
            if u.norm > MAX_NORM_RATIO * median:
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
            chunks.add(load(upload.sha256), scale)
        return chunks.mean()
    acc = Accumulator(spec, device, max_contributors=len(accepted))
    for upload, scale in accepted:
        acc.add(codec.decode(load(upload.sha256), spec)[1], scale)
    return acc.mean()
