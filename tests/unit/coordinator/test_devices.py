"""Where evaluation runs: a device and a precision for the coordinator's and the validators' forward
passes. A version's parameters and hash follow from the accepted uploads alone: decoding, clipping, the
mean and the outer step stay fp32 on the CPU whatever the evaluation device, so two coordinators whose
verdicts agree publish the same hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.device import autocast_dtype, pick_device
from tests.helpers.pool import EVAL, RECIPE, OpenPool, encode, fixed_miner, trained_delta

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_devices_by_name() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, why in [
        ("tpu", "unknown device 'tpu'"),
        ("meta", "only cpu and cuda"),
        ("cuda:99", "'cuda:99'"),
    ]:
        with pytest.raises(ValueError, match=why):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_bf16_autocast_on_cuda_by_default_fp32_on_the_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu) is None and autocast_dtype(cuda) is torch.bfloat16
    assert autocast_dtype(cuda, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16


def _first_version(
    open_pool: OpenPool, state: Path, validation: dict[str, Any], device: str = "cpu"
) -> tuple[dict[str, str], int, str]:
    """A synchronous round of three honest miners (fixed keys) on a coordinator evaluating on ``device``
    with ``validation``: its verdicts, and the number and hash of the version it made (on samples of 8 own
    and 8 other sequences: the same verdicts are what matters, not their power)."""
    rounds = {"min_quorum": 3, "overlap": False}
    validation = {**EVAL, "own_sequences": 8, "other_sequences": 8, **validation}
    with open_pool(
        recipe=RECIPE, validation=validation, rounds=rounds, device=device, state_dir=state
    ) as pool:
        for m in [fixed_miner(pool, i) for i in range(3)]:
            assert m.upload(0, encode(trained_delta(pool, m.pubkey, 0, 0), 0, 0)[0]).status_code == 200
        latest = pool.latest_after(0)
        verdicts = {s["miner"]: s["status"] for s in pool.record(0)["submissions"]}
    return verdicts, latest["version"], latest["param_hash"]


@pytest.mark.parametrize(
    ("validation", "device"),
    [
        pytest.param({"precision": "bf16", "batch_size": 3}, "cpu", id="cpu-bf16"),
        pytest.param({}, "cuda", id="cuda", marks=CUDA),
    ],
)
def test_evaluating_elsewhere_publishes_the_same_hashes(
    open_pool: OpenPool, tmp_path: Path, validation: dict[str, Any], device: str
) -> None:
    reference = _first_version(open_pool, tmp_path / "fp32", {"precision": "fp32"})
    verdicts, version, _ = reference
    assert version == 1 and set(verdicts.values()) == {"accepted"} and len(verdicts) == 3
    assert _first_version(open_pool, tmp_path / device, validation, device) == reference
