"""Real miner processes (``gradpool mine``) against a coordinator on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from gradpool.processes import Child, Processes

# A coordinator whose rounds are quick: one miner is a quorum, a few sequences to train and evaluate on
QUICK_ROUNDS = {
    "GRADPOOL_ROUNDS__MIN_QUORUM": "1",
    "GRADPOOL_ROUNDS__DEADLINE_S": "2",
    "GRADPOOL_ROUNDS__MIN_DEADLINE_S": "1",
    "GRADPOOL_DATA__EVAL_EVERY": "20",
    "GRADPOOL_DATA__EVAL_SEQUENCES": "8",
    "GRADPOOL_RECIPE__INNER_STEPS": "2",
    "GRADPOOL_RECIPE__BATCH_SIZE": "2",
}


def mine_args(url: str, key: Path, state: Path) -> list[str]:
    """``gradpool mine`` with this key and state, one thread."""
    key_and_state = ["--key", str(key), "--create-key", "--state-dir", str(state)]
    return ["mine", "--coordinator", url, *key_and_state, "--threads", "1"]


def start_miner(url: str, key: Path, state: Path, log: Path) -> Child:
    """A miner process that mines until it is stopped, its output in ``log`` (``NAME.log``)."""
    return Processes(log.parent).start(log.stem, mine_args(url, key, state))
