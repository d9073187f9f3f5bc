"""The quiet cheats, which the cheap checks cannot tell from honest work, in a short real network: each is
refused or scored below every honest miner (the lazy miner, the quietest, in test_lazy_miner.py: a file of
its own, so that the two long networks run side by side).

Synchronous rounds, where every upload is judged before its version, so that a refusal is one per round.
Overlapped rounds (the default) put a refused miner on probation instead of refusing it again, and
judge trusted miners after the version: test_cheap_majority.py runs freeriders at the defaults, and
test_adversaries.py the loud cheats. (Measured on overlapped rounds: the freerider is refused
once, then on probation every round; in the lazy network one honest miner was flagged low_gain once and
sat out two rounds, which the "every honest miner took part" check does not allow.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cheats import cheat_network, honest_and_cheats

pytestmark = pytest.mark.slow  # real networks of miner processes


@pytest.mark.timeout(420)
def test_copycat_stale_and_freerider_are_refused(tmp_path: Path, corpus_file: Path) -> None:
    kinds, rounds = ("copycat", "stale", "freerider"), 3
    report = cheat_network(tmp_path, corpus_file, kinds, 3, rounds, overlap=False)
    _, cheats, _ = honest_and_cheats(report, kinds, 3, rounds)
    assert cheats["freerider"]["refusals"].get("low_gain", 0) >= rounds - 1
