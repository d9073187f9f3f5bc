"""The aggregation rule's mean: after each contributor is clipped (``protocol.codec.measure``), at every
coordinate the mean over the contributors that selected it (sum / count, not sum / number of miners).

An ``Accumulator`` takes one contributor at a time into a running sum and count, so memory does not grow
with the number of contributors; ``FlatAccumulator`` does it over the concatenated parameters for any
codec, ``protocol.codec.chunk_accumulator.ChunkAccumulator`` in SparseLoCo's chunk layout. Robust options:
trimmed mean and median.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch

from protocol.codec.measure import Decoded, clip_scale, clip_scales, update_norm
from protocol.payload import ParamSpec

MAX_CONTRIBUTORS = (1 << 31) - 1


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
        return {
            name: self.sum[o : o + math.prod(s)].view(s)
            for (name, s), o in zip(self.spec, self.offsets.values(), strict=True)
        }


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


RobustMethod = Literal["trimmed_mean", "median"]


@torch.no_grad()
def robust_mean(
    coords: torch.Tensor, values: torch.Tensor, total: int, method: RobustMethod, trim_fraction: float = 0.2
) -> torch.Tensor:
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
