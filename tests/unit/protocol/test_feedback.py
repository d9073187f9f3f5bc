"""Error feedback: the residual keeps what compression did not send, so nothing is lost over rounds."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, SparseLoCoCodec, SparseTensor
from protocol.codec.feedback import ErrorFeedback

HEADER = PayloadHeader(format_version=PAYLOAD_FORMAT_VERSION, codec="sparseloco", round=0, base_version=0)


def test_accumulate_is_beta_e_plus_delta_then_subtract() -> None:
    ef = ErrorFeedback(beta=0.5)
    d1 = {"w": torch.tensor([1.0, 2.0, -4.0])}
    e = ef.accumulate(d1)
    assert torch.equal(e["w"], d1["w"])
    assert e["w"].data_ptr() != d1["w"].data_ptr()  # a copy: the caller's delta is not the buffer
    ef.subtract({"w": SparseTensor(torch.tensor([0]), torch.tensor([1.0]))})
    assert ef.buffers["w"].tolist() == [0.0, 2.0, -4.0]
    e = ef.accumulate({"w": torch.tensor([3.0, 1.0, 1.0])})
    assert e["w"].tolist() == [3.0, 2.0, -1.0]  # 0.5 * [0, 2, -4] + [3, 1, 1]
    assert d1["w"].tolist() == [1.0, 2.0, -4.0]


def test_subtract_removes_exactly_what_was_sent() -> None:
    ef = ErrorFeedback(beta=0.95)
    ef.accumulate({"m": torch.arange(6.0).view(2, 3), "v": torch.ones(4)})
    ef.subtract(
        {
            "m": SparseTensor(torch.tensor([1, 5]), torch.tensor([1.0, 0.5])),  # flat indices
            "v": SparseTensor(None, torch.tensor([1.0, 0.0, -1.0, 0.25])),  # every element
        }
    )
    assert ef.buffers["m"].tolist() == [[0.0, 0.0, 2.0], [3.0, 4.0, 4.5]]
    assert ef.buffers["v"].tolist() == [0.0, 1.0, 2.0, 0.75]


def test_accumulate_casts_to_fp32_and_restarts_on_a_shape_change() -> None:
    ef = ErrorFeedback(beta=0.95)
    ef.accumulate({"w": torch.ones(4, dtype=torch.bfloat16)})
    assert ef.buffers["w"].dtype == torch.float32
    e = ef.accumulate({"w": torch.full((2, 2), 3.0)})
    assert e["w"].shape == (2, 2) and e["w"].tolist() == [[3.0, 3.0], [3.0, 3.0]]


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_beta_outside_unit_interval_is_refused(beta: float) -> None:
    with pytest.raises(ValueError):
        ErrorFeedback(beta)


def test_state_dict_round_trip() -> None:
    ef = ErrorFeedback(beta=0.9)
    ef.accumulate({"a": torch.randn(3, 4), "b": torch.randn(7)})
    state = {n: t.clone() for n, t in ef.state_dict().items()}
    other = ErrorFeedback(beta=0.9)
    other.load_state_dict(state)
    assert set(other.buffers) == {"a", "b"}
    for name, t in state.items():
        assert torch.equal(other.buffers[name], t)
    # The loaded buffers are independent of the state they came from.
    state["a"].zero_()
    assert not torch.equal(other.buffers["a"], state["a"])
    # Both continue identically.
    delta = {"a": torch.randn(3, 4), "b": torch.randn(7)}
    for name in delta:
        assert torch.equal(ef.accumulate(delta)[name], other.accumulate(delta)[name])


def _relative_gap(sent: torch.Tensor, wanted: torch.Tensor) -> float:
    return float((wanted - sent).norm() / wanted.norm())


def test_error_feedback_makes_the_sum_of_updates_approach_the_sum_of_deltas() -> None:
    shape = (64, 128)
    spec = [("w", shape)]
    codec = SparseLoCoCodec(k=256)  # 1/16 of each tile per round
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    deltas = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(50)]
    total = torch.stack(deltas).sum(0)

    def run(beta: float | None) -> list[float]:
        ef, sent, gaps = ErrorFeedback(0.0 if beta is None else beta), torch.zeros(shape), []
        for r, delta in enumerate(deltas, 1):
            x = {"w": delta} if beta is None else ef.accumulate({"w": delta})
            _, decoded = codec.encode(x, spec, HEADER)
            if beta is not None:
                ef.subtract(decoded)
            sent += decoded["w"].to_dense(shape)
            if r in (10, 50):
                gaps.append(_relative_gap(sent, torch.stack(deltas[:r]).sum(0)))
        return gaps

    full, decayed, none = run(1.0), run(0.95), run(None)
    assert _relative_gap(torch.zeros(shape), total) == 1.0
    # beta = 1: what was sent converges to what was wanted (the residual stays bounded).
    assert full[1] < 0.2 and full[1] < full[0] / 2
    # Without error feedback the same coordinates are sent every round and the gap never closes.
    assert none[1] > 0.6 and none[1] > 0.9 * none[0]
    # The recipe's beta = 0.95 sits in between, far better than none.
    assert decayed[1] < 0.5 * none[1]
