"""Robust per-coordinate aggregation: median and trimmed mean over the contributors at each coordinate."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec.accumulate import RobustMethod, robust_mean

METHODS: list[RobustMethod] = ["median", "trimmed_mean"]
Contributor = dict[int, float]


def flatten(contributors: list[Contributor], rng: random.Random | None = None) -> tuple[torch.Tensor, ...]:
    pairs = [(c, v) for contributor in contributors for c, v in contributor.items()]
    if rng is not None:
        rng.shuffle(pairs)
    coords = torch.tensor([c for c, _ in pairs], dtype=torch.int64)
    return coords, torch.tensor([v for _, v in pairs], dtype=torch.float32)


def reference(
    coords: torch.Tensor, values: torch.Tensor, total: int, method: str, trim: float
) -> torch.Tensor:
    """Naive: a Python loop over coordinates, on the float32 values as Python floats."""
    per_coord: dict[int, list[float]] = {}
    for c, v in zip(coords.tolist(), values.tolist(), strict=True):
        per_coord.setdefault(c, []).append(v)
    out = [0.0] * total
    for c, vs in per_coord.items():
        if method == "median":
            out[c] = statistics.median(vs)
        else:
            t = math.floor(trim * len(vs))
            kept = sorted(vs)[t : len(vs) - t]
            out[c] = sum(kept) / len(kept)
    return torch.tensor(out, dtype=torch.float32)


def random_contributors(rng: random.Random, n: int, total: int, density: float) -> list[Contributor]:
    return [
        {c: rng.uniform(-10, 10) for c in rng.sample(range(total), int(density * total))} for _ in range(n)
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.2, 0.3, 0.49])
def test_matches_reference_on_random_inputs(method: RobustMethod, seed: int, trim: float) -> None:
    rng = random.Random(seed)
    total = 200
    coords, values = flatten(random_contributors(rng, rng.randint(5, 12), total, 0.3), rng)
    counts = torch.bincount(coords, minlength=total).tolist()
    assert 1 in counts and any(n % 2 == 0 for n in counts) and any(n % 2 and n > 1 for n in counts)
    out = robust_mean(coords, values, total, method, trim)
    assert out.dtype == torch.float32 and out.shape == (total,)
    torch.testing.assert_close(out, reference(coords, values, total, method, trim), rtol=1e-6, atol=1e-6)
    assert all(out[c] == 0 for c, n in enumerate(counts) if n == 0)


@settings(max_examples=50, deadline=None)
@given(
    contributors=st.lists(
        st.dictionaries(
            st.integers(0, 15), st.floats(-1e3, 1e3, width=32, allow_subnormal=False), max_size=16
        ),
        max_size=9,
    ),
    method=st.sampled_from(METHODS),
    trim=st.floats(0.0, 0.49),
    rng=st.randoms(use_true_random=False),
)
def test_property_matches_reference_in_any_order(
    contributors: list[Contributor], method: RobustMethod, trim: float, rng: random.Random
) -> None:
    coords, values = flatten(contributors, rng)
    out = robust_mean(coords, values, 16, method, trim)
    torch.testing.assert_close(out, reference(coords, values, 16, method, trim), rtol=1e-6, atol=1e-4)
    # the result lies within the range of the values given for each coordinate
    for c in set(coords.tolist()):
        vs = values[coords == c]
        assert vs.min() <= out[c] <= vs.max()


def test_median_of_odd_even_and_single_counts() -> None:
    coords = torch.tensor([0, 1, 0, 1, 2, 0, 1, 1], dtype=torch.int64)
    values = torch.tensor([5.0, 1.0, -1.0, 4.0, 7.0, 2.0, 2.0, 10.0])
    out = robust_mean(coords, values, 4, "median")
    # coordinate 0: {5, -1, 2} -> 2; coordinate 1: {1, 4, 2, 10} -> (2 + 4) / 2; 2: {7} alone; 3: nobody
    assert out.tolist() == [2.0, 3.0, 7.0, 0.0]


def test_trimmed_mean_drops_floor_of_fraction_from_each_end() -> None:
    coords = torch.zeros(4, dtype=torch.int64)
    values = torch.tensor([10.0, 0.0, 2.0, 1.0])
    assert robust_mean(coords, values, 1, "trimmed_mean", 0.2).item() == 13.0 / 4  # floor(0.8) = 0
    assert robust_mean(coords, values, 1, "trimmed_mean", 0.25).item() == 1.5  # floor(1.0) = 1: {1, 2}
    single = robust_mean(torch.tensor([3]), torch.tensor([-4.5]), 5, "trimmed_mean", 0.4)
    assert single.tolist() == [0.0, 0.0, 0.0, -4.5, 0.0]


def test_trim_fraction_zero_is_the_mean_over_the_contributors_that_selected_each_coordinate() -> None:
    rng = random.Random(7)
    total = 300
    coords, values = flatten(random_contributors(rng, 7, total, 0.4), rng)
    summed = torch.zeros(total).index_add_(0, coords, values)
    count_mean = summed / torch.bincount(coords, minlength=total).clamp_min(1)
    out = robust_mean(coords, values, total, "trimmed_mean", 0.0)
    torch.testing.assert_close(out, count_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_outlier_is_removed(method: RobustMethod, sign: float) -> None:
    # coordinate 2 has five contributors, one of them wildly off; coordinate 0 is an honest neighbour
    coords = torch.tensor([2, 0, 2, 2, 0, 2, 2], dtype=torch.int64)
    values = torch.tensor([1.0, 0.5, 2.0, sign * 1e9, 1.5, 3.0, 4.0])
    out = robust_mean(coords, values, 3, method, 0.2)
    # sorted: {1, 2, 3, 4, +outlier} or {-outlier, 1, 2, 3, 4}; trimming 0.2 of 5 drops one from each end
    if method == "median":
        expected = 3.0 if sign > 0 else 2.0
    else:
        expected = (2.0 + 3.0 + 4.0) / 3 if sign > 0 else (1.0 + 2.0 + 3.0) / 3
    assert out[2].item() == pytest.approx(expected)
    assert out[0].item() == 1.0 and out[1].item() == 0.0
    plain = (values[coords == 2].double().sum() / 5).item()
    assert abs(plain) > 1e8  # the plain mean would have been dragged away


@pytest.mark.parametrize("method", METHODS)
def test_empty_input_gives_zeros(method: RobustMethod) -> None:
    out = robust_mean(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 6, method)
    assert out.dtype == torch.float32 and out.tolist() == [0.0] * 6


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.75, 1.0, math.nan])
def test_invalid_trim_fraction_raises(trim: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        robust_mean(torch.tensor([0]), torch.tensor([1.0]), 1, "trimmed_mean", trim)


def test_mismatched_lengths_and_unknown_method_raise() -> None:
    with pytest.raises(ValueError):
        robust_mean(torch.tensor([0, 1]), torch.tensor([1.0]), 2, "median")
    with pytest.raises(ValueError, match="method"):
        robust_mean(torch.tensor([0]), torch.tensor([1.0]), 1, "mean")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method: RobustMethod) -> None:
    rng = random.Random(3)
    coords, values = flatten(random_contributors(rng, 9, 500, 0.3), rng)
    out = robust_mean(coords.cuda(), values.cuda(), 500, method)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), robust_mean(coords, values, 500, method), rtol=1e-6, atol=1e-6)
