"""The miner's local state survives restarts byte for byte; a corrupt file is moved aside."""

from __future__ import annotations

from pathlib import Path

import torch

from node.state import STATE_FILE, MinerState, load_state, save_state
from node.trainer import InnerTrainer
from protocol.codec.feedback import ErrorFeedback
from protocol.model import build_model
from protocol.wire import TrainingRecipe

CPU = torch.device("cpu")


def trained() -> tuple[InnerTrainer, ErrorFeedback]:
    model = build_model("tiny", seed=1)
    trainer = InnerTrainer(model, TrainingRecipe(inner_steps=2, batch_size=2, warmup_steps=1), CPU)
    trainer.run(torch.randint(0, 256, (4, 129)))
    ef = ErrorFeedback(0.9)
    ef.accumulate({n: torch.randn_like(p) for n, p in model.named_parameters()})
    return trainer, ef


def test_state_round_trips_exactly(tmp_path: Path) -> None:
    trainer, ef = trained()
    save_state(tmp_path, MinerState(version=7, inner_step=2, rounds_done=3), ef, trainer.optimizer, "run-a")
    fresh_trainer = InnerTrainer(build_model("tiny", seed=1), trainer.recipe, CPU)
    fresh_ef = ErrorFeedback(0.9)
    state = load_state(tmp_path, fresh_ef, fresh_trainer.optimizer, "run-a", CPU)
    assert state == MinerState(version=7, inner_step=2, rounds_done=3)
    for name, e in ef.buffers.items():
        assert torch.equal(fresh_ef.buffers[name], e)
    old, new = trainer.optimizer.state_dict()["state"], fresh_trainer.optimizer.state_dict()["state"]
    assert old.keys() == new.keys()
    for i in old:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(old[i][key]), torch.as_tensor(new[i][key]))


def test_a_corrupt_state_file_is_moved_aside_and_the_miner_starts_clean(tmp_path: Path) -> None:
    trainer, ef = trained()
    save_state(tmp_path, MinerState(1, 2, 1), ef, trainer.optimizer, "run-a")
    path = tmp_path / STATE_FILE
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    fresh_ef = ErrorFeedback(0.9)
    fresh = InnerTrainer(build_model("tiny"), trainer.recipe, CPU)
    assert load_state(tmp_path, fresh_ef, fresh.optimizer, "run-a", CPU) is None
    assert not path.exists()
    assert len(list(tmp_path.glob(STATE_FILE + ".corrupt-*"))) == 1
    assert fresh_ef.buffers == {} and fresh.optimizer.state_dict()["state"] == {}


def test_state_of_another_run_is_not_used(tmp_path: Path) -> None:
    trainer, ef = trained()
    save_state(tmp_path, MinerState(1, 2, 1), ef, trainer.optimizer, "run-a")
    assert load_state(tmp_path, ErrorFeedback(), trainer.optimizer, "run-b", CPU) is None
