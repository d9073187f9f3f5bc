"""Several processes on one miner: DDP inner steps equal one process's on the whole batch, and a two-process
torchrun miner (gloo on the CPU) mines against a real coordinator with rank 0 alone on the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from node.trainer import InnerTrainer
from protocol.model import build_model
from protocol.params import get_params
from protocol.wire import TrainingRecipe

pytestmark = pytest.mark.slow  # torch.multiprocessing and torchrun

RECIPE = TrainingRecipe(inner_steps=3, batch_size=4, lr=3e-3, warmup_steps=1)


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (RECIPE.inner_steps * RECIPE.batch_size, 129), generator=g)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = build_model("tiny", seed=3)
        result = InnerTrainer(model, RECIPE, torch.device("cpu")).run(tokens())
        torch.save({"params": get_params(model), "loss": result.loss_after}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_inner_steps_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    start = get_params(build_model("tiny", seed=3))
    single = build_model("tiny", seed=3)
    alone = InnerTrainer(single, RECIPE, torch.device("cpu")).run(tokens())
    reference = get_params(single)
    for name in reference:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), "replicas must agree"
    # The update (theta_0 - theta_H) of two processes equals one process's, up to summation order, which
    # AdamW can amplify where a gradient is near zero: compare whole updates, not single elements.
    ddp = torch.cat([(start[n] - ranks[0]["params"][n]).reshape(-1) for n in reference])
    one = torch.cat([(start[n] - reference[n]).reshape(-1) for n in reference])
    assert float(one.norm()) > 0
    assert float((ddp - one).norm() / one.norm()) < 1e-3
    assert abs(ranks[0]["loss"] - alone.loss_after) < 1e-4


def test_a_two_process_torchrun_miner_mines(live_coordinator: Any, tmp_path: Path) -> None:
    with live_coordinator(recipe={"batch_size": 4}) as server:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        key, state = str(tmp_path / "k.pem"), str(tmp_path / "state")
        mine = [
            "-m",
            "gradpool",
            "mine",
            "--coordinator",
            server.url,
            "--key",
            key,
            "--create-key",
            "--state-dir",
            state,
            "--threads",
            "1",
            "--max-rounds",
            "2",
        ]
        args = [*torchrun, *mine]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL
        )
        status = server.wait_rounds(2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["accepted"] for r in status["rounds"][:2]] == [1, 1]
    assert status["miners"] == 1, "only rank 0 registers"
    assert "rank stopped after 2 rounds" in done.stderr
