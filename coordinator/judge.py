"""The checks at aggregation: which of a round's uploads go into the next version, and why not."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.aggregate import Decoded, update_norm
from protocol.codec import Codec, ParamSpec
from protocol.errors import CodecError

MAX_NORM_RATIO = 10.0  # refuse an update whose norm exceeds this multiple of the median (3+ uploads)


@dataclass(frozen=True)
class Upload:
    miner: str
    content_sha256: str
    path: Path


def judge(uploads: Sequence[Upload], codec: Codec, spec: ParamSpec,
          ) -> tuple[dict[str, str | None], list[Decoded]]:  # fmt: skip
    """Each upload's verdict (None: accepted, else the reason) and the accepted decoded updates, in
    arrival order. Reasons: copied_payload (the later uploader of an update already seen), the codec's
    error codes, empty_update, non_finite, norm_outlier."""
    verdicts: dict[str, str | None] = {}
    updates: list[tuple[str, Decoded, float]] = []
    seen: set[str] = set()
    for u in uploads:
        if u.content_sha256 in seen:
            verdicts[u.miner] = "copied_payload"
            continue
        seen.add(u.content_sha256)
        try:
            _, update = codec.decode(u.path.read_bytes(), spec)
        except CodecError as e:
            verdicts[u.miner] = e.code
            continue
        norm = update_norm(update)
        if not math.isfinite(norm) or norm == 0.0:
            verdicts[u.miner] = "empty_update" if norm == 0.0 else "non_finite"
            continue
        updates.append((u.miner, update, norm))
    if len(updates) >= 3:
        median = statistics.median(n for _, _, n in updates)
        for miner, _, norm in updates:
            if norm > MAX_NORM_RATIO * median:
                verdicts[miner] = "norm_outlier"
    accepted = [u for m, u, _ in updates if m not in verdicts]
    for m, _, _ in updates:
        verdicts.setdefault(m, None)
    return verdicts, accepted
