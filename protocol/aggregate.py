"""Aggregation of decoded updates: median-norm clip, then the mean over the contributors that selected
each coordinate (sum / count, not sum / number of miners)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from protocol.payload import ParamSpec, SparseTensor

Decoded = dict[str, SparseTensor]


def update_norm(update: Decoded) -> float:
    return math.sqrt(sum(float(t.values.double().square().sum()) for t in update.values()))


def clip_scales(norms: Sequence[float]) -> list[float]:
    """scale = min(1, median / own): nobody contributes more than the median contributor's norm."""
    if not norms:
        return []
    median = statistics.median(norms)
    return [1.0 if n <= median or n == 0 else median / n for n in norms]


@torch.no_grad()
def aggregate(
    updates: Sequence[Decoded],
    spec: ParamSpec,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The aggregate A of the given updates, dense, one tensor per parameter."""
    scales = clip_scales([update_norm(u) for u in updates])
    out: dict[str, torch.Tensor] = {}
    for name, shape in spec:
        n = math.prod(shape)
        total = torch.zeros(n, dtype=torch.float32, device=device)
        count = torch.zeros(n, dtype=torch.float32, device=device)
        for update, scale in zip(updates, scales, strict=True):
            t = update[name]
            vals = t.values.to(device=device, dtype=torch.float32) * scale
            if t.indices is None:
                total += vals
                count += 1
            else:
                idx = t.indices.to(device)
                total.index_add_(0, idx, vals)
                count.index_add_(0, idx, torch.ones_like(vals))
        out[name] = (total / count.clamp_min(1)).view(shape)
    return out
