"""Every kind of loud cheating miner (one the checks can refuse), in a short real network, is refused or
scored below every honest miner; the quiet kinds, which only the scores can tell, are in
test_quiet_cheats.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cheats import cheat_network, honest_and_cheats

pytestmark = pytest.mark.slow  # a real network of miner processes

LOUD = ("noise", "scaled", "signflip", "nan", "lutscale")


@pytest.mark.timeout(420)
def test_every_loud_cheat_is_refused_or_ranked_below_the_honest(tmp_path: Path, corpus_file: Path) -> None:
    """At the production default, overlapped rounds: uploads are judged against, and applied to, the
    version made while they trained. Synchronous rounds, where every upload is judged before its version,
    run whole networks in test_quiet_cheats.py and test_lazy_miner.py, and harmful and noisy uploads in
    both modes in tests/unit/coordinator/test_scoring.py: one loud network per mode would add a minute and
    a half to the suite's longest tier for no check that the others lack."""
    rounds = 3
    report = cheat_network(tmp_path, corpus_file, LOUD, 3, rounds)
    _, cheats, worst_honest = honest_and_cheats(report, LOUD, 3, rounds)
    refused = {kind: cheat["refusals"] for kind, cheat in cheats.items()}
    assert set(refused["nan"]) == {"non_finite"} and refused["nan"]["non_finite"] >= rounds // 2
    # its error feedback makes every other upload of `scaled` a rescaled replay of an earlier one; an upload
    # x100 is far above the round's norms, or, where no reference stands yet, measured as harmful
    scaled = refused["scaled"]
    assert set(scaled) <= {"norm_outlier", "replayed_update", "harmful"}, scaled
    assert sum(scaled.values()) >= rounds - 1, scaled
    assert refused["signflip"].get("harmful", 0) >= 1
    assert refused["lutscale"].get("norm_outlier", 0) >= rounds - 1  # value tables x1e30: far above
    # noise: not refused in every round, yet ranked below; lutscale: refused with a verdict that measured
    # the honest work it rescaled (clipped to the reference norm), yet it earns a refusal's score
    assert cheats["noise"]["score"] < worst_honest and cheats["lutscale"]["score"] < worst_honest
