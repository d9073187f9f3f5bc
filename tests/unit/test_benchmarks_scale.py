"""benchmarks.scale end to end on the tiny model: every field measured and projected."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from benchmarks.scale import PASSES_PER_UPLOAD, main

MEASURED = {
    "model",
    "device",
    "forward_s_per_sequence",
    "eval_ratio",
    "aggregate_s",
    "publish_s",
    "checkpoint_s",
    "peak_rss_bytes",
}
PROJECTED = {"model", "miners", "validators", "version_out_s", "scored_s", "miner_inner_s"}


@pytest.mark.timeout(180)
def test_measured_and_projected() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(["--json", "--models", "tiny", "--sequences", "4", "--uploads", "2", "--threads", "1"])
    assert json.loads(out.getvalue()) == json.loads(json.dumps(result))  # stdout holds the JSON only
    (row,) = result["measured"]
    assert MEASURED <= set(row) and row["model"] == "tiny" and row["device"] == "cpu"
    assert row["forward_s_per_sequence"] > 0 and 0 < row["eval_ratio"] < 2
    assert min(row["aggregate_s"], row["publish_s"], row["checkpoint_s"]) > 0
    assert row["peak_rss_bytes"] > 4 * row["params"]
    projected = result["projected"]
    assert len(projected) == 2 * 3 * 3 and all(PROJECTED <= set(p) for p in projected)
    by = {(p["model"], p["miners"], p["validators"]): p for p in projected}
    # tiny was measured, not the projected sizes: their CPU work is scaled from it by parameter count
    assert by[("gpt2-124m", 64, 4)]["cpu_work"].startswith("scaled from tiny")
    assert by[("gpt2-124m", 64, 4)]["version_out_s"] < by[("gpt2-124m", 256, 4)]["version_out_s"]
    one_pass = by[("gpt2-124m", 16, 0)]["scored_s"] / (16 * PASSES_PER_UPLOAD)
    assert by[("llama-1b", 16, 0)]["scored_s"] > 10 * 16 * PASSES_PER_UPLOAD * one_pass  # 10x the FLOPs
    assert by[("gpt2-124m", 64, 16)]["scored_s_if_shared"] < by[("gpt2-124m", 64, 4)]["scored_s_if_shared"]
