"""The dataset format: the held-out split, training ids and assignments (building: test_corpus.py)."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.data import assignment, num_eval_total, train_id

FAST = settings(max_examples=40, deadline=None)
MINER = "ab" * 32


# -- training ids and assignments -------------------------------------------------------------------------
@FAST
@given(eval_every=st.integers(2, 60), extra=st.integers(0, 3000))
def test_train_id_enumerates_every_training_sequence_once(eval_every: int, extra: int) -> None:
    num_sequences = 2 * eval_every + extra
    num_train = num_sequences - num_eval_total(num_sequences, eval_every)
    ids = [train_id(j, eval_every) for j in range(num_train)]
    assert ids == [i for i in range(num_sequences) if i % eval_every != 0]


def test_held_out_ids_are_every_eval_every_th() -> None:
    assert num_eval_total(100, 10) == 10 and num_eval_total(101, 10) == 11
    assert [train_id(j, 3) for j in range(6)] == [1, 2, 4, 5, 7, 8]


@FAST
@given(
    seed=st.integers(0, 2**63),
    round_=st.integers(0, 10**6),
    eval_every=st.integers(2, 60),
    extra=st.integers(0, 5000),
    count=st.integers(0, 64),
)
def test_assignment_is_in_range_and_never_held_out(
    seed: int, round_: int, eval_every: int, extra: int, count: int
) -> None:
    num_sequences = 2 * eval_every + extra
    ids = assignment(seed, round_, MINER, count, num_sequences, eval_every)
    assert len(ids) == count
    assert all(0 < i < num_sequences and i % eval_every != 0 for i in ids)
    assert ids == assignment(seed, round_, MINER, count, num_sequences, eval_every)


def test_assignment_depends_on_seed_round_and_miner() -> None:
    args = {"count": 32, "num_sequences": 100_000, "eval_every": 50}
    base = assignment(1, 7, MINER, **args)
    assert assignment(2, 7, MINER, **args) != base
    assert assignment(1, 8, MINER, **args) != base
    assert assignment(1, 7, "cd" * 32, **args) != base
    # The public key is hex: its case does not change who it is.
    assert assignment(1, 7, MINER.upper(), **args) == base
    # A longer assignment extends a shorter one.
    assert assignment(1, 7, MINER, 40, 100_000, 50)[:32] == base


def test_assignment_pins_its_hash_construction() -> None:
    # Anyone can recompute an assignment: sha256 of "gradpool-assign:seed:round:miner:i", first 8 bytes LE.
    digest = hashlib.sha256(f"gradpool-assign:5:3:{MINER}:0".encode()).digest()
    j = int.from_bytes(digest[:8], "little") % (1000 - 100)
    assert assignment(5, 3, MINER, 1, 1000, 10) == [train_id(j, 10)]


def test_assignment_covers_the_training_set_roughly_uniformly() -> None:
    ids = assignment(0, 0, MINER, 20_000, 1000, 10)
    counts = np.bincount(ids, minlength=1000)
    assert counts[::10].sum() == 0
    trained = counts[np.arange(1000) % 10 != 0]
    assert trained.min() > 0 and trained.max() < 3 * trained.mean()
