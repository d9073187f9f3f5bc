"""The GPU check: ``bash benchmarks/gpu_check.sh`` on a machine with one NVIDIA GPU, after ``make venv``.

Each part under a time limit of its own (together at most 11 minutes; about 6 on an H100 host with 16
cores), one JSON object on stdout:

- ``tests``: the suite's CUDA tests (robust aggregation on the GPU against the CPU; the published update's
  count per chunk on the GPU against the CPU; a coordinator evaluating on CUDA publishes the hashes of one
  evaluating on the CPU), pytest's exit code and summary;
- ``network``: ``gradpool simulate`` of a coordinator and 2 miners, all on CUDA, 3 rounds of ``llama-150m``
  (a byte vocabulary, short rounds): the report's losses and round times;
- ``throughput``: ``benchmarks.throughput`` on CUDA: the miner's inner loop against a bare PyTorch loop,
  tokens/s and MFU against ``--peak-tflops`` (989: an H100 SXM's dense bf16);
- ``scale`` and ``scale_1b``: ``benchmarks.scale`` on CUDA, every preset up to ``llama-1b``.

A part that fails or runs out of time says so (``rc``, ``error``) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

NETWORK = {
    "device": "cuda",
    "recipe": {"inner_steps": 10, "batch_size": 8, "warmup_steps": 5},
    "rounds": {"deadline_s": 60.0, "min_deadline_s": 5.0},
    "validation": {"own_sequences": 16, "other_sequences": 16},
    "data": {"eval_every": 20, "eval_sequences": 16},
}


def run(command: list[str], timeout_s: float) -> dict[str, Any]:
    """The command's exit code, its last JSON object on stdout (if any), its stderr's tail and its time."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return {
            "rc": None,
            "error": f"ran past {timeout_s:.0f} s",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    out: dict[str, Any] = {"rc": done.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    try:
        out["result"] = json.loads(done.stdout)
    except ValueError:
        out["stdout_tail"] = done.stdout[-2000:]
    if done.returncode:
        out["stderr_tail"] = done.stderr[-2000:]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--out", type=Path, default=None, help="keep the network's run here (default: temporary)")
    args = p.parse_args(argv)
    py = sys.executable
    import torch  # after the arguments: --help answers without it

    result: dict[str, Any] = {
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    tests = [
        "tests/unit/protocol/test_robust_aggregate.py",
        "tests/unit/protocol/test_counted.py",
        "tests/unit/coordinator/test_devices.py",
    ]
    pytest = run([py, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "cuda", *tests], 150)
    result["tests"] = {
        "rc": pytest["rc"],
        "summary": pytest.get("stdout_tail", "").strip().splitlines()[-1:] or pytest.get("error"),
    }
    with tempfile.TemporaryDirectory(prefix="gradpool-gpu-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "network.toml").write_text(tomli_w.dumps(NETWORK))
        net = ["-m", "gradpool", "simulate", "--miners", "2", "--rounds", "3", "--model", "llama-150m"]
        network = run([py, *net, "--out", str(work / "run"), "--config", str(work / "network.toml")], 240)
        report = work / "run" / "report.json"
        if report.exists():
            r = json.loads(report.read_text())
            network["report"] = {
                "initial_eval_loss": r.get("initial_eval_loss"),
                "final_eval_loss": r.get("final_eval_loss"),
                "rounds": [
                    {k: row.get(k) for k in ("round", "eval_loss", "wall_s", "compute_s")}
                    for row in r["rounds"]
                ],
            }
        network.pop("stdout_tail", None)
        result["network"] = network
    result["throughput"] = run(
        [
            py,
            "-m",
            "benchmarks.throughput",
            "--device",
            "cuda",
            "--models",
            "gpt2-124m,llama-150m",
            "--peak-tflops",
            str(args.peak_tflops),
            "--json",
        ],
        120,
    )
    scale = [py, "-m", "benchmarks.scale", "--device", "cuda", "--json"]
    result["scale"] = run([*scale, "--models", "gpt2-124m,llama-150m"], 120)
    result["scale_1b"] = run([*scale, "--models", "llama-1b"], 180)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
