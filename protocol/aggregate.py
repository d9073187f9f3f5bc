"""Aggregation of decoded updates: median-norm clip, then the mean over the contributors that selected
each coordinate (sum / count, not sum / number of miners).

``Accumulator`` takes one contributor at a time into a running sum and count over the concatenated
parameters, so memory does not grow with the number of contributors. ``sketch`` summarises an update in a
few kilobytes so that near-identical updates (copies, rescaled copies) can be found without keeping them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal

import torch

from protocol.payload import ParamSpec, SparseTensor

Decoded = dict[str, SparseTensor]
SKETCH_BUCKETS = 1024


def update_norm(update: Decoded) -> float:
    return math.sqrt(sum(float(t.values.double().square().sum()) for t in update.values()))


def clip_scales(norms: Sequence[float]) -> list[float]:
    """scale = min(1, median / own): nobody contributes more than the median contributor's norm."""
    if not norms:
        return []
    median = statistics.median(norms)
    return [1.0 if n <= median or n == 0 else median / n for n in norms]


class Accumulator:
    """Running sum and count per coordinate, flat over the parameters in spec order."""

    def __init__(
        self, spec: ParamSpec, device: torch.device | str = "cpu", max_contributors: int = 255
    ) -> None:
        self.spec = [(n, tuple(s)) for n, s in spec]
        self.offsets: dict[str, int] = {}
        total = 0
        for name, shape in self.spec:
            self.offsets[name] = total
            total += math.prod(shape)
        count_dtype = torch.uint8 if max_contributors <= 255 else torch.int32
        self.sum = torch.zeros(total, dtype=torch.float32, device=device)
        self.count = torch.zeros(total, dtype=count_dtype, device=device)
        self.contributors = 0

    @torch.no_grad()
    def add(self, update: Decoded, scale: float = 1.0) -> None:
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


def aggregate(updates: Sequence[Decoded], spec: ParamSpec, device: torch.device | str = "cpu",
              ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The aggregate A of the given updates, dense, one tensor per parameter."""
    acc = Accumulator(spec, device, max_contributors=len(updates))
    for update, scale in zip(updates, clip_scales([update_norm(u) for u in updates]), strict=True):
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
    """``sketch`` of an update given as coordinates in the concatenated parameters (below 2**31)."""
    h = (coords * 2654435761) % 4294967291
    sign = 1.0 - 2.0 * ((coords * 2246822519) % 4294967279 % 2).double()
    out = torch.zeros(buckets, dtype=torch.float64)
    out.index_add_(0, h % buckets, values.double() * sign)
    return out.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float(a.double() @ b.double()) / (na * nb)


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
