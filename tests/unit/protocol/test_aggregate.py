"""Aggregation: median-norm clip, then the mean over the contributors that selected each coordinate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import SparseTensor
from protocol.codec.accumulate import aggregate
from protocol.codec.measure import clip_scales, update_norm

SPEC = [("w", (2, 4)), ("b", (3,))]


def sparse(indices: list[int], values: list[float]) -> SparseTensor:
    return SparseTensor(torch.tensor(indices, dtype=torch.int64), torch.tensor(values))


def nothing() -> SparseTensor:
    return sparse([], [])


def test_update_norm_counts_every_tensor() -> None:
    u = {"w": sparse([0, 5], [3.0, 4.0]), "b": SparseTensor(None, torch.tensor([0.0, 12.0, 0.0]))}
    assert update_norm(u) == 13.0


def test_clip_scales() -> None:
    assert clip_scales([]) == []
    assert clip_scales([2.0]) == [1.0]
    assert clip_scales([1.0, 2.0, 4.0]) == [1.0, 1.0, 0.5]
    assert clip_scales([0.0, 0.0, 5.0]) == [1.0, 1.0, 0.0]
    assert clip_scales([1.0, 3.0]) == [1.0, 2.0 / 3.0]  # median of two is their mean


def test_disjoint_contributors_keep_their_own_values() -> None:
    a = {"w": sparse([0, 1], [3.0, 4.0]), "b": nothing()}  # norm 5
    b = {"w": sparse([6], [-5.0]), "b": nothing()}  # norm 5
    out = aggregate([a, b], SPEC)
    assert out["w"].shape == (2, 4) and out["b"].shape == (3,)
    assert out["w"].reshape(-1).tolist() == [3.0, 4.0, 0.0, 0.0, 0.0, 0.0, -5.0, 0.0]
    assert out["b"].tolist() == [0.0, 0.0, 0.0]


def test_overlapping_coordinates_get_the_mean_of_those_who_selected_them() -> None:
    a = {"w": sparse([0, 2], [3.0, 4.0]), "b": sparse([1], [0.0])}  # norm 5
    b = {"w": sparse([0, 7], [0.0, 3.0]), "b": sparse([1], [4.0])}  # norm 5
    c = {"w": sparse([0], [3.0]), "b": sparse([2], [4.0])}  # norm 5
    assert [update_norm(u) for u in (a, b, c)] == [5.0, 5.0, 5.0]
    out = aggregate([a, b, c], SPEC)
    # w[0] chosen by all three: (3 + 0 + 3) / 3; w[2] and w[7] by one each: their own value, not / 3.
    assert out["w"].reshape(-1).tolist() == [2.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    # b[1] chosen by a (value 0) and b: a's zero still counts as a selection.
    assert out["b"].tolist() == [0.0, 2.0, 4.0]


def test_dense_contributors_count_at_every_coordinate() -> None:
    a = {"w": SparseTensor(None, torch.full((8,), 2.0)), "b": SparseTensor(None, torch.zeros(3))}
    b = {"w": sparse([3], [4.0 * math.sqrt(2.0)]), "b": nothing()}  # same norm as a: no clipping
    out = aggregate([a, b], SPEC)
    assert out["w"].reshape(-1)[3].item() == pytest.approx((2.0 + 4.0 * math.sqrt(2.0)) / 2)
    assert out["w"].reshape(-1)[0].item() == 2.0


def test_a_scaled_up_contributor_is_clipped_to_the_median_norm() -> None:
    honest = [{"w": sparse([i], [1.0]), "b": nothing()} for i in (0, 1)]
    loud = {"w": sparse([2, 3], [100.0, 0.0]), "b": nothing()}  # x100, norm 100
    out = aggregate([*honest, loud], SPEC)
    # Median norm is 1: the loud contributor is scaled by 1/100 and lands at the honest size.
    assert out["w"].reshape(-1)[:4].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert float(out["w"].abs().max()) == 1.0


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    loud=st.floats(1.0, 1e4),
)
def test_no_coordinate_exceeds_the_largest_clipped_value(n: int, seed: int, loud: float) -> None:
    g = torch.Generator().manual_seed(seed)
    spec = [("w", (50,))]
    updates = []
    for i in range(n):
        idx = torch.randperm(50, generator=g)[:10]
        vals = torch.randn(10, generator=g) * (loud if i == 0 else 1.0)
        updates.append({"w": SparseTensor(idx, vals)})
    scales = clip_scales([update_norm(u) for u in updates])
    out = aggregate(updates, spec)["w"]
    # Each coordinate is a mean of clipped values, so it is bounded by the largest clipped magnitude.
    bound = max(float(u["w"].values.abs().max()) * s for u, s in zip(updates, scales, strict=True))
    assert float(out.abs().max()) <= bound * (1 + 1e-6)
    # A coordinate nobody selected stays zero.
    chosen = torch.zeros(50, dtype=torch.bool)
    for u in updates:
        chosen[u["w"].indices] = True
    assert bool((out[~chosen] == 0).all())
