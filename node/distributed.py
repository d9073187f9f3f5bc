"""Several devices on one miner: ``torchrun --nproc-per-node N -m gradpool mine ...`` starts one process per
device. Rank 0 alone talks to the coordinator; every round it hands the others the base parameters and
the assigned sequences, and all ranks run the inner steps data-parallel (DDP): each takes an equal share
of every batch and the gradients are averaged, so the update equals one process's on the whole batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from node.trainer import InnerTrainer
from protocol.device import pick_device

log = logging.getLogger(__name__)


def init_from_env() -> tuple[int, int]:
    """(rank, world size), starting torch.distributed when torchrun launched more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device(requested: str) -> torch.device:
    """The device of this rank: its own GPU under torchrun, else what was asked for."""
    if dist.is_initialized() and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return pick_device(requested)


def share(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled between this miner's own processes, never from the wire)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_params(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def share_trainer_state(trainer: InnerTrainer) -> None:
    """Rank 0's optimizer state and step on every rank (after rank 0 restored them from disk)."""
    state = share({"optimizer": trainer.optimizer.state_dict(), "step": trainer.step})
    if dist.get_rank() != 0:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step = state["step"]


def leave() -> None:
    """Every rank, once rank 0 has said stop: meet, then take the process group down before the interpreter
    exits (left to interpreter shutdown, gloo's threads can abort the process)."""
    dist.barrier()
    dist.destroy_process_group()


def follow(trainer: InnerTrainer) -> int:
    """The loop of ranks other than 0: train on what rank 0 sends until it says stop; rounds trained."""
    rounds = 0
    while True:
        message = share()
        if message["cmd"] == "stop":
            leave()
            return rounds
        if message["cmd"] == "state":
            share_trainer_state(trainer)
        elif message["cmd"] == "train":
            share_params(trainer.model)
            trainer.run(message["tokens"], round_=message.get("round"))
            rounds += 1
