"""The coordinator's side of the signed history: a state directory from before it was kept gets the records
of its versions and rollbacks, which a node verifies; and a history is only ever extended with the key
that signed it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.publishing.history import History, coordinator_key
from coordinator.storage.store import SqlStore
from protocol.history import Chain
from protocol.signing import generate_key, public_key_hex, save_key


def old_state(path: Path, rolled_back: dict[int, float], bases: dict[int, int]) -> SqlStore:
    """A store as the releases before the history wrote it: versions 0..n, no records."""
    store = SqlStore(f"sqlite:///{path}")
    with store.transaction() as db:
        for v in range(max(bases, default=0) + 1):
            db.execute(
                "INSERT INTO versions (version, round, param_hash, update_sha, checkpoint_sha, created_at, "
                "base_version, rolled_back_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    v,
                    None if v == 0 else v - 1,
                    f"{v:064x}",
                    None if v == 0 else f"{v + 100:064x}",
                    f"{v + 200:064x}",
                    float(v),
                    bases.get(v),
                    rolled_back.get(v),
                ),
            )
    return store


@pytest.mark.parametrize(
    ("rolled_back", "bases", "head", "aside"),
    [
        ({}, {1: 0, 2: 1}, 2, set()),
        ({2: 9.0}, {1: 0, 2: 1}, 1, {2}),  # rolled back, and nothing made since
        ({2: 9.0, 3: 9.0}, {1: 0, 2: 1, 3: 2, 4: 1}, 4, {2, 3}),  # rolled back, then a version on 1
        ({}, {1: None, 2: None}, 2, set()),  # (the first releases kept no base)
    ],
)
def test_the_history_of_an_old_state_directory_is_signed_and_verifies(
    tmp_path: Path, rolled_back: dict[int, float], bases: dict[int, int], head: int, aside: set[int]
) -> None:
    store = old_state(tmp_path / "state.db", rolled_back, bases)
    key = generate_key()
    try:
        assert History(key, "r", store).backfill() > 0
        assert History(key, "r", store).backfill() == 0  # once
        chain = Chain(public_key_hex(key), "r")
        chain.extend(store.records())
        assert (chain.head, chain.set_aside) == (head, aside)
        assert store.head()[0] == head
    finally:
        store.close()


def test_the_history_is_extended_only_with_the_key_that_signed_it(tmp_path: Path) -> None:
    store = old_state(tmp_path / "state.db", {}, {1: 0})
    try:
        path = tmp_path / "coordinator.pem"
        key = coordinator_key(path, store)  # made: nothing is signed yet
        History(key, "r", store).backfill()
        assert public_key_hex(coordinator_key(path, store)) == public_key_hex(key)
        with pytest.raises(ValueError, match=r"no coordinator key at .* give the key that signed it"):
            coordinator_key(tmp_path / "elsewhere.pem", store)
        other = tmp_path / "other.pem"
        save_key(generate_key(), other)
        with pytest.raises(ValueError, match="did not sign this run's history"):
            coordinator_key(other, store)
    finally:
        store.close()
