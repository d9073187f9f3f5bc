"""The adversarial benchmark's loss reference: the mean of a mix's honest-only runs, from one result file or
pooled from several (``--compare``). The networks themselves run in tests/integration."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.adversarial import main


def _run(kind: str, final: float, tail: float | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {"kind": kind, "final_eval_loss": final, "miners": []}
    if tail is not None:
        run["tail_eval_loss"] = tail
    if kind != "honest":
        run["honest_outrank_fraction"] = 1.0
    return run


def _write(path: Path, mixes: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"mixes": mixes}))
    return path


def test_compare_pools_every_honest_only_run_of_a_mix_as_its_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = _write(
        tmp_path / "matrix.json",
        [
            {
                "mix": "8:2",
                "honest": 8,
                "cheaters": 2,
                "honest_run": _run("honest", 2.0),
                "runs": [_run("lazy", 2.31), _run("noise", 2.09)],
            },
            {
                "mix": "4:4",
                "honest": 4,
                "cheaters": 4,
                "honest_run": _run("honest", 3.0, 3.1),
                "runs": [_run("freerider", 3.3, 3.1)],
            },
        ],
    )
    references = _write(
        tmp_path / "refs.json",
        [
            {
                "mix": "8:2",
                "honest": 8,
                "cheaters": 2,
                "honest_run": _run("honest", 2.2, 2.3),
                "honest_runs": [_run("honest", 2.2, 2.3), _run("honest", 2.4, 2.5)],
                "runs": [],
            },
        ],
    )
    result = main(["--json", "--compare", str(matrix), str(references)])
    assert json.loads(capsys.readouterr().out) == result
    by_mix = {m["mix"]: m for m in result["mixes"]}
    eight = by_mix["8:2"]
    assert eight["honest_final_eval_losses"] == [2.0, 2.2, 2.4]
    assert eight["honest_final_eval_loss"] == pytest.approx(2.2)
    assert eight["honest_sd"] == pytest.approx(0.2)
    assert eight["honest_tail_eval_loss"] == pytest.approx(2.4)  # of the runs that have a tail
    lazy, noise = eight["runs"]
    assert lazy["loss_vs_honest"] == pytest.approx(2.31 / 2.2) and lazy["source"] == "matrix.json"
    assert noise["loss_vs_honest"] == pytest.approx(2.09 / 2.2)
    assert lazy["tail_vs_honest"] is None  # the run itself has none
    four = by_mix["4:4"]
    assert four["honest_sd"] is None and four["honest_final_eval_loss"] == 3.0
    assert four["runs"][0]["loss_vs_honest"] == pytest.approx(1.1)
    assert four["runs"][0]["tail_vs_honest"] == pytest.approx(1.0)
    assert not any(math.isnan(r["loss_vs_honest"]) for m in result["mixes"] for r in m["runs"])


def test_compare_refuses_a_file_that_is_no_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other.json").write_text('{"close": []}')
    for name in ("other.json", "missing.json"):
        with pytest.raises(SystemExit) as exit_:
            main(["--compare", str(tmp_path / name)])
        assert exit_.value.code == 2
        assert f"{name}: not a benchmarks.adversarial result" in capsys.readouterr().err


def test_references_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--references", "0", "--kinds", ""])
    assert exit_.value.code == 2
    assert "--references must be at least 1" in capsys.readouterr().err
