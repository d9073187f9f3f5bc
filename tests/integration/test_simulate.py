"""`gradpool simulate` end to end: processes on 127.0.0.1, a row per round, report.json and loss.png; a real
run from a parquet corpus and a trained tokenizer to a model transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.replay import replay
from tests.helpers.cli import gradpool as run_gradpool

ROUND_FIELDS = {
    "round",
    "version",
    "eval_loss",
    "accepted",
    "rejected",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "compute_s",
}


ROUNDS = 8  # the llama network's


def gradpool(*args: str) -> subprocess.CompletedProcess[str]:
    return run_gradpool(*args, timeout_s=240)


@pytest.mark.slow  # a real network of miner processes
def test_a_llama_on_parquet_with_a_bpe_tokenizer_learns_and_loads_in_transformers(
    tmp_path: Path, corpus_file: Path
) -> None:
    """The whole job on a fresh clone: train a tokenizer on a parquet corpus, run a network of llama-tiny
    miners on it, rebuild every version offline from what the run kept (``benchmarks.replay``), and load
    the result in transformers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers

    text = corpus_file.read_text(encoding="utf-8")
    (tmp_path / "corpus").mkdir()
    for part in range(2):
        docs = [text[i : i + 4000] for i in range(part * 4000, len(text), 8000)]
        pq.write_table(
            pa.table({"text": docs}), tmp_path / "corpus" / f"part-{part}.parquet", row_group_size=16
        )
    tokenizer = tmp_path / "tokenizer.json"
    trained = gradpool(
        "tokenizer",
        "train",
        "--corpus",
        str(tmp_path / "corpus"),
        "--vocab-size",
        "1024",
        "--out",
        str(tokenizer),
    )
    assert trained.returncode == 0, trained.stderr
    cfg = tmp_path / "sim.toml"
    cfg.write_text(
        "[data]\neval_every = 20\neval_sequences = 16\n"
        "[recipe]\ninner_steps = 8\nbatch_size = 8\nwarmup_steps = 2\nlr = 0.003\n"
        "[validation]\nown_sequences = 32\nother_sequences = 32\nearly_factor = 1\n"
    )
    out = tmp_path / "run"
    done = gradpool(
        "simulate",
        "--miners",
        "2",
        "--rounds",
        str(ROUNDS),
        "--model",
        "llama-tiny",
        "--corpus",
        str(tmp_path / "corpus"),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--config",
        str(cfg),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(ROUNDS)]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(ROUNDS))
    assert all(ROUND_FIELDS <= set(r) for r in report["rounds"])
    assert report["rounds"][-1]["version"] == ROUNDS
    assert report["final_eval_loss"] == report["rounds"][-1]["eval_loss"] <= 0.8 * report["initial_eval_loss"]
    assert report["config"]["miners"] == 2 and report["config"]["codec"]["name"] == "sparseloco"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coordinator_pid = int(json.loads((out / "coordinator.ready").read_text())["pid"])
    with pytest.raises(ProcessLookupError):
        os.kill(coordinator_pid, 0)  # simulate stopped the processes it started

    (tmp_path / "replay").mkdir()
    replayed = replay(out, tmp_path / "replay")
    # every version rebuilt bit for bit, offline
    assert replayed["replayed"] == replayed["versions"] >= ROUNDS
    assert [r["round"] for r in replayed["rounds"]] == list(range(replayed["versions"]))
    for r in replayed["rounds"]:
        if r["uploads"] == r["accepted"]:  # the published version is the carried build, or the fresh one
            kept = r["carried"] if r["carried"] <= r["base"] else min(r["carried"], r["fresh"])  # when better
            assert r["published"] == pytest.approx(kept, rel=1e-6), r
    exported = gradpool("export", "--state-dir", str(out / "coordinator"), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 1024
    ids = tok("def main():", return_tensors="pt").input_ids
    assert tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]).startswith("def main():")


def test_simulate_fails_cleanly_when_the_coordinator_cannot_start(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('[data]\ncorpus = "/nonexistent/corpus"\n')
    done = gradpool(
        "simulate", "--miners", "1", "--rounds", "1", "--out", str(tmp_path / "run"), "--config", str(cfg)
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr and "corpus path" in done.stderr
