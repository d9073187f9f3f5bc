"""Aggregation of decoded updates: median-norm clip, then the mean over the contributors that selected
each coordinate (sum / count, not sum / number of miners).

An ``Accumulator`` takes one contributor at a time into a running sum and count, so memory does not grow
with the number of contributors; ``FlatAccumulator`` does it over the concatenated parameters for any
codec, ``protocol.chunk_accumulator.ChunkAccumulator`` in SparseLoCo's chunk layout. ``sketch`` summarises an
update in a few kilobytes so that near-identical updates (copies, rescaled copies, replays) can be found
without keeping them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch

from protocol.payload import ParamSpec, SparseTensor

Decoded = dict[str, SparseTensor]
SKETCH_BUCKETS = 1024
MAX_CONTRIBUTORS = (1 << 31) - 1


def update_norm(update: Decoded) -> float:
    return math.sqrt(sum(float(t.values.double().square().sum()) for t in update.values()))


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


class Accumulator(Protocol):
    """A running sum and count of clipped updates, one contributor at a time: memory does not grow with the
    number of contributors. Each codec gives its own (``Codec.accumulator``): it reads back the form that
    intake stored for a payload (``Examined.stored``)."""

    contributors: int

    def add_stored(self, stored: bytes, scale: float = 1.0) -> None: ...

    def mean(self) -> dict[str, torch.Tensor]: ...


def count_dtype(max_contributors: int) -> torch.dtype:
    """The smallest count type for this many contributors: uint8 up to 255, int32 beyond."""
    if max_contributors <= 255:
        return torch.uint8
    if max_contributors <= MAX_CONTRIBUTORS:
        return torch.int32
    raise ValueError(f"at most {MAX_CONTRIBUTORS} contributors, got {max_contributors}")


def check_room(contributors: int, count: torch.dtype) -> None:
    """Refuse a contributor that the count type cannot hold."""
    limit = 255 if count == torch.uint8 else MAX_CONTRIBUTORS
    if contributors >= limit:
        raise ValueError(f"this accumulator counts at most {limit} contributors")


class FlatAccumulator:
    """Running sum and count per coordinate, flat over the parameters in spec order (any codec's decoded
    updates; ``decode`` turns a stored payload into one)."""

    def __init__(
        self,
        spec: ParamSpec,
        device: torch.device | str = "cpu",
        max_contributors: int = 255,
        decode: Callable[[bytes], Decoded] | None = None,
    ) -> None:
        self.spec = [(n, tuple(s)) for n, s in spec]
        self.offsets: dict[str, int] = {}
        total = 0
        for name, shape in self.spec:
            self.offsets[name] = total
            total += math.prod(shape)
        self.sum = torch.zeros(total, dtype=torch.float32, device=device)
        self.count = torch.zeros(total, dtype=count_dtype(max_contributors), device=device)
        self.decode = decode
        self.contributors = 0

    def add_stored(self, stored: bytes, scale: float = 1.0) -> None:
        if self.decode is None:
            raise ValueError("this accumulator was built without a decoder")
        self.add(self.decode(stored), scale)

    @torch.no_grad()
    def add(self, update: Decoded, scale: float = 1.0) -> None:
        check_room(self.contributors, self.count.dtype)
        for name, shape in self.spec:
            t, o = update[name], self.offsets[name]
            n = math.prod(shape)
            vals = t.values.to(self.sum.device, torch.float32)
            if t.indices is None:
                self.sum[o : o + n].add_(vals, alpha=scale)
                self.count[o : o + n] += 1
            else:
                idx = t.indices.to(self.sum.device) + o
                self.sum.index_add_(0, idx, vals, alpha=scale)
                self.count.index_add_(0, idx, torch.ones(len(idx), dtype=self.count.dtype, device=idx.device))
        self.contributors += 1

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """The aggregate, computed in place in the running sum (the accumulator is spent afterwards)."""
        divide_by_count(self.sum, self.count)
        self.count = torch.zeros(0, dtype=self.count.dtype)
        return {name: self.sum[o : o + math.prod(s)].view(s) for (name, s), o in
                zip(self.spec, self.offsets.values(), strict=True)}  # fmt: skip


def divide_by_count(total: torch.Tensor, count: torch.Tensor, step: int = 1 << 22) -> None:
    """total /= max(count, 1), in place, a slice at a time so that temporaries stay small."""
    for lo in range(0, total.numel(), step):
        total[lo : lo + step].div_(count[lo : lo + step].clamp_min(1))


def aggregate(
    updates: Sequence[Decoded],
    spec: ParamSpec,
    device: torch.device | str = "cpu",
    reference: float | None = None,
) -> dict[str, torch.Tensor]:
    """The aggregate A of the given updates, dense, one tensor per parameter: each clipped to ``reference``
    (None: their median norm), then the mean over the contributors that selected each coordinate."""
    norms = [update_norm(u) for u in updates]
    scales = clip_scales(norms) if reference is None else [clip_scale(n, reference) for n in norms]
    acc = FlatAccumulator(spec, device, max_contributors=len(updates))
    for update, scale in zip(updates, scales, strict=True):
        acc.add(update, scale)
    return acc.mean()


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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if not (math.isfinite(na) and math.isfinite(nb)) or na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


RobustMethod = Literal["trimmed_mean", "median"]


@torch.no_grad()
def robust_mean(coords: torch.Tensor, values: torch.Tensor, total: int, method: RobustMethod,
                trim_fraction: float = 0.2) -> torch.Tensor:  # fmt: skip
    """A robust mean at each coordinate over the values given for it (0 where none): the median, or the mean
    after dropping the floor(trim_fraction * n) smallest and largest of its n values. Unlike sum / count,
    a minority of extreme contributors at a coordinate cannot move it far.

    ``coords`` (int64, in [0, total)) and ``values`` (float32, already clip-scaled) are the concatenated
    sparse updates, at most one value per contributor and coordinate. Vectorised: sort by value, then stably
    by coordinate, so each coordinate's values form a sorted segment; memory O(len(coords)) besides the
    output, which is float32 on the device of ``values``."""
    if method == "trimmed_mean" and not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if method not in ("trimmed_mean", "median"):
        raise ValueError(f"unknown method {method!r}")
    if coords.shape != values.shape or coords.dim() != 1:
        raise ValueError(f"coords and values must be 1-D of one length, got {coords.shape}, {values.shape}")
    out = torch.zeros(total, dtype=torch.float32, device=values.device)
    if coords.numel() == 0:
        return out
    coords = coords.to(values.device, torch.int64)
    perm = torch.argsort(values)
    perm = perm[torch.argsort(coords[perm], stable=True)]
    sorted_values = values[perm].double()
    uniq, counts = torch.unique_consecutive(coords[perm], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if method == "median":
        result = (sorted_values[starts + (counts - 1) // 2] + sorted_values[starts + counts // 2]) / 2
    else:
        t = torch.floor(counts.double() * trim_fraction).long()
        segment = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
        rank = torch.arange(len(sorted_values), device=values.device) - starts[segment]  # place in segment
        kept = (rank >= t[segment]) & (rank < (counts - t)[segment])
        sums = torch.zeros(len(counts), dtype=torch.float64, device=values.device)
        sums.index_add_(0, segment[kept], sorted_values[kept])  # per-segment sums: no cancellation
        result = sums / (counts - 2 * t)
    out[uniq] = result.float()
    return out
