"""What the chaos soak (benchmarks/chaos.py) holds the network to, and its processes: each check of its
docstring as code, the nodes it kills and starts again, and the wait after the last kill."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cluster import Replicas
from gradpool.processes import Processes
from protocol.model import build_model
from protocol.params import apply_update, decode_update, load_checkpoint, param_spec, params_hash

SETTLE_S = 180.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Node:
    """One process of the network, started again after every kill with the same arguments."""

    def __init__(self, procs: Processes, name: str, kind: str, args: list[str], ready: Path | None = None):
        self.procs, self.name, self.kind, self.args, self.ready = procs, name, kind, args, ready
        self.starts: list[float] = []

    def start(self, wait: bool = True) -> str:
        """Start it (a coordinator: and wait until it listens, unless not ``wait``: a standby; its URL)."""
        self.starts.append(time.time())
        if self.ready is not None and wait:
            return self.procs.start_coordinator(self.args, self.ready, name=self.name)
        if self.ready is not None:
            self.ready.unlink(missing_ok=True)
            self.procs.start(self.name, ["coordinator", "serve", *self.args, "--ready-file", str(self.ready)])
            return ""
        self.procs.start(self.name, self.args)
        return ""

    def exited(self) -> int | None:
        return self.procs.dead().get(self.name) if self.name in self.procs.procs else None

    def kill(self) -> None:
        self.procs.kill(self.name)

    def lines(self) -> Iterator[dict[str, Any]]:
        """The node's JSON log lines."""
        for line in self.procs.log(self.name).splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


class Checks:
    """What must hold at every moment; each breach is recorded once, as a sentence."""

    def __init__(self, model: str = "tiny") -> None:
        self.model = model
        self.violations: list[str] = []
        self.versions: dict[int, tuple[str, float | None]] = {}
        self.closed: dict[int, dict[str, tuple[str, str, str | None]]] = {}

    def violation(self, message: str) -> None:
        if message not in self.violations:
            log(f"VIOLATION: {message}")
            self.violations.append(message)

    def poll(self, http: Replicas) -> None:
        """Everything new since the last poll, compared with what was seen before."""
        current = http.get("/v1/round").json()
        v = 0
        while v <= current["version"] or v in self.versions:
            r = http.get(f"/v1/versions/{v}")
            if r.status_code == 404:
                break
            info = r.json()
            seen = (info["param_hash"], info["eval_loss"])
            if info["eval_loss"] is None or not math.isfinite(info["eval_loss"]):
                self.violation(f"version {v} was published with held-out loss {info['eval_loss']}")
            if self.versions.setdefault(v, seen) != seen:
                self.violation(f"version {v} changed: {self.versions[v]} -> {seen}")
            v += 1
        for r in range(current["round"]):
            if r in self.closed and r < current["round"] - 3:
                continue  # checked often enough; the final pass reads every round again
            self._round(http, r)

    def poll_if_up(self, http: Replicas) -> None:
        """``poll``, unless no coordinator process answers now (one may be down or starting)."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            self.poll(http)

    def _round(self, http: Replicas, r: int) -> None:
        record = http.get(f"/v1/rounds/{r}").json()
        if record["status"] != "closed":
            return
        subs = {s["miner"]: (s["sha256"], s["status"], s["reason"]) for s in record["submissions"]}
        if self.closed.setdefault(r, subs) != subs:
            self.violation(f"round {r} changed after it closed: {self.closed[r]} -> {subs}")

    def final(
        self, http: Replicas, nodes: list[Node], keys: dict[str, str], grace_s: float, end: float
    ) -> dict[str, Any]:
        current = http.get("/v1/round").json()
        self.poll(http)  # a round may still close meanwhile: the newest version seen is the last
        latest = max(self.versions)
        for r in range(current["round"]):
            self._round(http, r)
        self._uploads_kept(http, nodes, keys)
        self._chain(http, latest)
        self._back_at_work(nodes, grace_s, end)
        losses = [loss for _, loss in (self.versions[v] for v in sorted(self.versions))]
        initial, final = losses[0], self.versions[latest][1]
        if initial is None or final is None or not final < initial:
            self.violation(f"the held-out loss did not fall: {initial} -> {final}")
        return {
            "rounds": current["round"],
            "versions": len(self.versions),
            "initial_eval_loss": initial,
            "final_eval_loss": final,
        }

    def _uploads_kept(self, http: Replicas, nodes: list[Node], keys: dict[str, str]) -> None:
        for node in nodes:
            for line in node.lines():
                words = line.get("message", "").split()
                if "upload taken" not in line.get("message", ""):
                    continue
                round_, sha = int(words[1].rstrip(":")), words[-1]
                record = http.get(f"/v1/rounds/{round_}").json()
                kept = {s["miner"]: s["sha256"] for s in record.get("submissions", [])}
                if kept.get(keys[node.name]) != sha:
                    self.violation(
                        f"{node.name}'s upload {sha[:12]} taken in round {round_} is not in its record"
                    )

    def _chain(self, http: Replicas, latest: int) -> None:
        """Every kept checkpoint, and version 0 with every published update applied in turn, against the
        versions' hashes; every parameter finite."""
        spec = param_spec(build_model(self.model))
        base = http.get("/v1/checkpoint", params={"version": 0})
        params, _ = load_checkpoint(base.content, spec)
        by_version = {0: dict(params)}
        for v in range(1, latest + 1):
            info = http.get(f"/v1/versions/{v}").json()
            header, delta = decode_update(http.get(f"/v1/versions/{v}/update").content, spec)
            if header.base_version not in by_version:
                self.violation(f"version {v} builds on {header.base_version}, which the chain does not have")
                return
            params = {n: t.clone() for n, t in by_version[header.base_version].items()}
            apply_update(params, delta)
            if params_hash(params, spec) != info["param_hash"]:
                self.violation(f"replaying the published updates to version {v} misses its hash")
            if not all(bool(t.isfinite().all()) for t in params.values()):
                self.violation(f"version {v} has a non-finite parameter")
            by_version = {header.base_version: by_version[header.base_version], v: params}
            ckpt = http.get("/v1/checkpoint", params={"version": v})
            if ckpt.status_code == 200:
                served, _ = load_checkpoint(ckpt.content, spec)
                if params_hash(served, spec) != info["param_hash"]:
                    self.violation(f"the checkpoint served for version {v} misses its hash")

    def _back_at_work(self, nodes: list[Node], grace_s: float, end: float) -> None:
        """After every start of a node, and every start of the coordinator, each honest miner takes part
        again (an upload taken), and the validator posts verdicts again, unless the run ended first."""
        restarts = {t for n in nodes if n.kind == "coordinator" for t in n.starts[1:]}
        for node in nodes:
            if node.kind not in ("miner", "validator"):
                continue
            markers = ("upload taken",) if node.kind == "miner" else ("verdicts (", "nothing to evaluate")
            done = [line["ts"] for line in node.lines() if any(m in line.get("message", "") for m in markers)]
            for t in sorted({*node.starts[1:], *restarts}):
                if t < end - grace_s and not any(d > t for d in done):
                    self.violation(f"{node.name} did not work again after a restart at {time.ctime(t)}")


def settle(checks: Checks, http: Replicas, at_last_kill: int) -> float | None:
    """After the last kill, nothing more is killed until the network publishes a version it had not when
    that kill came (and at least version 2): the seconds that took, or a violation after ``SETTLE_S``. A
    short soak on a loaded machine otherwise ends before its first round closes."""
    started = time.time()
    while time.time() < started + SETTLE_S:
        checks.poll_if_up(http)
        if max(checks.versions, default=0) > max(at_last_kill, 1):
            return round(time.time() - started, 1)
        time.sleep(1.0)
    checks.violation(f"no version was published within {SETTLE_S:.0f} s of the last kill")
    return None
