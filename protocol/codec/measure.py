"""What the aggregation rule measures of a decoded update: its norm, its clip to a reference norm, and a
sketch that finds near-identical updates (copies, rescaled copies, replays) without keeping them."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch

from protocol.payload import ParamSpec, SparseTensor

Decoded = dict[str, SparseTensor]


SKETCH_BUCKETS = 1024


def update_norm(update: Decoded) -> float:
    return math.sqrt(sum(float(t.values.double().square().sum()) for t in update.values()))


def layer_norms(update: Decoded, spec: ParamSpec) -> list[float]:
    """Each parameter's norm in the update (spec order), taken in float64 (huge values do not overflow)."""
    return [float(torch.linalg.vector_norm(update[name].values, dtype=torch.float64)) for name, _ in spec]


def clip_scales(norms: Sequence[float]) -> list[float]:
    """scale = min(1, median / own): nobody contributes more than the median contributor's norm."""
    if not norms:
        return []
    median = statistics.median(norms)
    return [clip_scale(n, median) for n in norms]


def clip_scale(norm: float, reference: float) -> float:
    """min(1, reference / norm): an update is scaled down to the reference norm, never up."""
    return 1.0 if norm <= reference or norm == 0 else reference / norm


def reference_norm(history: Sequence[float], norms: Sequence[float]) -> float | None:
    """The norm that judges a round's uploads: the median of this round's norms together with the accepted
    norms of recent rounds. Hostile uploads move it only if they outnumber every honest norm in the pool;
    in a small round, recent rounds' accepted uploads outvote them. None when there is no norm at all."""
    pool = [n for n in (*history, *norms) if math.isfinite(n) and n > 0]
    return statistics.median(pool) if pool else None


@torch.no_grad()
def sketch(update: Decoded, spec: ParamSpec, buckets: int = SKETCH_BUCKETS) -> torch.Tensor:
    """A count sketch of the update (each coordinate hashed to a bucket with a hashed sign): inner products
    and cosines of sketches estimate those of the updates, to within about 1/sqrt(buckets)."""
    return sketch_flat(*flatten(update, spec), buckets)


def flatten(update: Decoded, spec: ParamSpec, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The update as coordinates in the concatenated parameters (spec order) and their values x scale,
    on the CPU."""
    coords, values, offset = [], [], 0
    for name, shape in spec:
        t = update[name]
        n = math.prod(shape)
        coords.append((torch.arange(n) if t.indices is None else t.indices.cpu()) + offset)
        values.append(t.values.cpu().float() * scale)
        offset += n
    return torch.cat(coords), torch.cat(values)


def sketch_flat(coords: torch.Tensor, values: torch.Tensor, buckets: int = SKETCH_BUCKETS) -> torch.Tensor:
    """``sketch`` of an update given as coordinates in the concatenated parameters (below 2**31), scaled to
    unit norm in float64 first: any finite update, however large, gives a finite sketch (a copy x1e30 has
    the sketch of its original)."""
    h = (coords * 2654435761) % 4294967291
    sign = 1.0 - 2.0 * ((coords * 2246822519) % 4294967279 % 2).double()
    out = torch.zeros(buckets, dtype=torch.float64)
    out.index_add_(0, h % buckets, values.double() * sign)
    norm = float(out.norm())
    return (out / norm if norm > 0 and math.isfinite(norm) else out).float()


KEPT_SAMPLE = 512  # coordinates in a payload's kept sample
_HASH_A, _HASH_P = (
    2654435761,
    4294967311,
)  # a linear hash onto a prime above 2**32: no two coordinates collide


def kept_sample(coords: torch.Tensor, k: int = KEPT_SAMPLE) -> torch.Tensor:
    """A bottom-k sample of the coordinates an update keeps (below 2**31): the ``k`` smallest of their
    hashes, sorted (int64). Two samples estimate the overlap (Jaccard) of the kept sets to within about
    sqrt(J (1 - J) / k): near-copies of one update keep the same coordinates, whatever their values."""
    h = (coords.long() * _HASH_A) % _HASH_P
    if h.numel() > k:
        h = torch.topk(h, k, largest=False).values
    return torch.sort(h).values


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The estimated Jaccard overlap of two kept sets from their samples (``kept_sample``)."""
    return overlaps([a, b])[(0, 1)]


def overlaps(samples: Sequence[torch.Tensor]) -> dict[tuple[int, int], float]:
    """``overlap`` of every pair (i < j) of samples. Below the smaller of the two samples' largest hashes
    both samples are complete, so the overlap there estimates the whole sets' (a bottom-k estimate); every
    hash in both samples lies there."""
    sorted_ = [s.numpy() for s in samples]
    sets = [frozenset(s.tolist()) for s in sorted_]
    out = {}
    for i, j in itertools.combinations(range(len(samples)), 2):
        a, b = sorted_[i], sorted_[j]
        if not len(a) or not len(b):
            out[(i, j)] = 0.0
            continue
        top = min(a[-1], b[-1])
        both = len(sets[i] & sets[j])
        below = int(np.searchsorted(a, top, side="right")) + int(np.searchsorted(b, top, side="right"))
        out[(i, j)] = both / (below - both)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if not (math.isfinite(na) and math.isfinite(nb)) or na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)
