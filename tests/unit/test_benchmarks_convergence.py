"""The convergence benchmark end to end, at toy size: every method runs, reports, and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.convergence import METHODS, Config, main
from benchmarks.convergence_methods import merger

pytestmark = pytest.mark.timeout(120)  # generous: the shared run takes about 10 s on two busy cores
FIELDS = {"final_eval_loss", "bytes_per_round", "bytes_basis", "curve", "wall_s", "tokens"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("convergence")
    result = run_main(toy_argv(tmp, corpus_file, rounds=2), tmp / "stdout.json")
    assert (tmp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def toy_argv(root: Path, corpus: Path, rounds: int, *extra: str) -> list[str]:
    """The benchmark at toy size, its data, plot and output under ``root``; ``extra`` flags added."""
    return [
        "--json",
        "--workers=2",
        f"--rounds={rounds}",
        "--inner-steps=2",
        "--batch-size=2",
        "--warmup-steps=2",
        "--eval-sequences=8",
        "--threads=1",  # two threads on two busy cores can be ten times slower
        "--jobs=1",
        *extra,
        f"--corpus={corpus}",
        f"--data-dir={root / 'data'}",
        f"--out={root / 'curves.png'}",
    ]


def run_main(argv: list[str], capture: Path) -> dict[str, Any]:
    """The benchmark's JSON output for these arguments."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, capture.open("w") as out:
        mp.setattr("sys.stdout", out)
        try:
            assert main(argv) == 0
        finally:
            torch.set_num_threads(threads)  # main sets it for the process; leave other tests alone
    return json.loads(capture.read_text())  # type: ignore[no-any-return]


def test_every_method_reports_every_field(result: dict[str, Any]) -> None:
    assert result["config"]["workers"] == 2
    assert set(result["methods"]) == set(Config().methods) and set(Config().methods) <= set(METHODS)
    for name, m in result["methods"].items():
        assert FIELDS <= set(m), name
        assert m["error"] is None, name
        curve = m["curve"]
        assert [p["round"] for p in curve] == [0, 1, 2], name
        assert all(math.isfinite(p["eval_loss"]) for p in curve), name
        assert math.isfinite(m["final_eval_loss"]), name


def test_ddp_learns_and_tokens_add_up(result: dict[str, Any]) -> None:
    ddp = result["methods"]["ddp"]
    assert ddp["final_eval_loss"] < ddp["curve"][0]["eval_loss"]
    per_round = 2 * 2 * 2 * result["config"]["seq_len"]  # workers x inner steps x batch x seq_len
    for name in ("ddp", "diloco", "sparseloco"):
        assert result["methods"][name]["tokens"] == 2 * per_round, name
    assert result["methods"]["single"]["tokens"] == per_round  # one worker: 1/M of the tokens


def test_sparseloco_uploads_far_less_than_diloco(result: dict[str, Any]) -> None:
    dense = result["methods"]["diloco"]["bytes_per_round"]
    sparse = result["methods"]["sparseloco"]["bytes_per_round"]
    k128 = result["methods"]["sparseloco_k128"]["bytes_per_round"]
    assert dense >= 4 * result["config"]["num_params"]
    assert 0 < sparse * 100 < dense
    assert sparse < k128 < dense
    assert result["methods"]["single"]["bytes_per_round"] == 0
    down = result["methods"]["sparseloco_down"]  # the compressed downlink: about an upload's size
    assert down["download_bytes_per_round"] < 3 * sparse
    assert result["methods"]["sparseloco"]["downlink"] is None


def test_overlapped_rounds_share_the_first_round_and_part_after_it(tmp_path: Path, corpus_file: Path) -> None:
    """Round 0 trains from the initial model whatever the mode; from round 1 on, the overlapped methods
    train from a version behind (and the miner's way differs from the stale base alone)."""
    methods = ("sparseloco", "sparseloco_overlap", "sparseloco_overlap_delayed")
    argv = toy_argv(tmp_path, corpus_file, 3, f"--methods={','.join(methods)}")
    runs = run_main(argv, tmp_path / "stdout.json")["methods"]
    curves = {m: [p["eval_loss"] for p in r["curve"]] for m, r in runs.items()}
    assert (
        curves["sparseloco"][:2]
        == curves["sparseloco_overlap"][:2]
        == curves["sparseloco_overlap_delayed"][:2]
    )
    assert len({c[3] for c in curves.values()}) == 3, curves


def test_seeds_average_the_final_loss_and_the_cosine_schedule_differs_after_the_warm_up(
    tmp_path: Path, corpus_file: Path
) -> None:
    """--seeds 2: each method's final loss is the mean of its two seeds' (their spread beside); the
    cosine schedule trains round 0 (the warm-up) as the constant rate does, and decays after it."""
    methods = ("sparseloco", "sparseloco_cosine")
    argv = toy_argv(tmp_path, corpus_file, 2, "--seeds=2", f"--methods={','.join(methods)}")
    runs = run_main(argv, tmp_path / "stdout.json")["methods"]
    for name, r in runs.items():
        first, second = r["final_eval_loss_per_seed"]
        assert first != second, name  # another seed: another model and other data
        assert r["final_eval_loss"] == pytest.approx((first + second) / 2)
        assert r["final_eval_loss_sd"] == pytest.approx(abs(first - second) / math.sqrt(2))
        assert r["curve"][-1]["eval_loss"] == first  # the curve is the first seed's
    constant, cosine = ([p["eval_loss"] for p in runs[m]["curve"]] for m in methods)
    assert constant[:2] == cosine[:2] and constant[2:] != cosine[2:]


@pytest.mark.parametrize("carry", [1.0, 0.5, 0.0])
def test_the_merge_moves_the_model_to_the_new_version_keeping_carry_of_what_it_learned(carry: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    newest = {n: t + torch.randn_like(t) for n, t in base.items()}
    learned = {n: torch.randn_like(t) for n, t in base.items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(learned[n])  # where the first steps took it from the base
    on_step = merger(model, base, newest, at=0.5, steps=4, carry=carry)  # type: ignore[arg-type]
    on_step({})
    moved = dict(model.named_parameters())
    assert all(torch.equal(moved[n], base[n] + learned[n]) for n in base)  # not yet: 1 of the 2 steps
    on_step({})
    for n in base:
        torch.testing.assert_close(moved[n].detach(), newest[n] + carry * learned[n])
    on_step({})  # once only
    for n in base:
        torch.testing.assert_close(moved[n].detach(), newest[n] + carry * learned[n])
