"""A chaos soak: ``python -m benchmarks.chaos --minutes M --json``.

A coordinator, ``--miners`` (4) honest miners, hostile miners (``--hostile``: ``--adversary`` kinds,
``lutscale`` and ``signflip`` by default) and a validator run as real processes on 127.0.0.1. At random
moments (every ``--interval-s`` on average) one of them is killed with SIGKILL and started again: the
coordinator every other time, otherwise a miner or the validator. Throughout, and at the end, it checks:

- no accepted upload lost: every upload a miner was told was taken (its log) is in that round's record;
- each version published once: a version's parameter hash and loss never change once seen, and a closed
  round's uploads and verdicts never change;
- every served checkpoint, and the chain of published updates replayed from version 0, match the hashes;
- no version with a non-finite parameter or held-out loss;
- every honest miner, and the validator, back at work after each restart (theirs or the coordinator's);
- the held-out loss lower at the end than at the start.

After the last kill nothing more is killed until a version newer than the last kill is out (at most 180 s:
``settle_s`` says how long it took), so that a short soak on a slow machine still ends on a working network.

With ``--replicas 2 --store postgres`` the coordinator is two processes on a real PostgreSQL and a real
S3-compatible server (moto, its uploads straight to the bucket), sharing one key (benchmarks/cluster.py):
the one holding the leader lease runs the network, the other passes what it is asked on to it. A
coordinator kill is then of the leader two times in three (the other takes over: ``failover_s`` lists how
long until one led and answered again), else of the other process; PostgreSQL is restarted once, half
way. The nodes are given both URLs.

Output: ``{"minutes", "kills": {...}, "rounds", "versions", "violations": [...], "initial_eval_loss",
"final_eval_loss", "settle_s"}`` (replicas: ``kills`` with ``leader``, ``replica`` and ``postgres``, and
``"replicas", "store", "failover_s"``). A violation is a sentence; none is the target.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from benchmarks.chaos_checks import Checks, Node, log, settle
from benchmarks.cluster import Cluster, Replicas, free_port, wait_for
from gradpool.processes import Processes
from protocol.data import stdlib_dir
from protocol.signing import generate_key, load_key, public_key_hex, save_key

SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "rounds": {"min_quorum": 2, "deadline_s": 15.0, "min_deadline_s": 3.0},
    "recipe": {"inner_steps": 8, "batch_size": 8, "warmup_steps": 4},
    "data": {"eval_every": 20, "eval_sequences": 16},
    "validation": {"own_sequences": 32, "other_sequences": 32},
    "max_catchup_versions": 64,
}
STDLIB_FILES = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "textwrap.py", "typing.py"]


def corpus(root: Path) -> Path:
    path = root / "corpus.txt"
    path.write_text("\n\n".join((stdlib_dir() / n).read_text(encoding="utf-8") for n in STDLIB_FILES))
    return path


def coordinators(
    procs: Processes, settings: dict[str, Any], work: Path, replicas: int
) -> tuple[list[Node], list[str]]:
    """The coordinator process (or, on a shared store, ``replicas`` of them, each with a state directory and
    a port of its own), started: the first listening, the others standing by. Their nodes and URLs."""
    nodes, urls = [], []
    for i in range(replicas):
        name = "coordinator" if replicas == 1 else f"replica-{i}"
        mine = {**settings, "state_dir": str(work / name)}
        if replicas > 1:
            mine["cluster"] = {**settings["cluster"], "name": name}
        (work / f"{name}.toml").write_text(tomli_w.dumps(mine))
        serve = ["--config", str(work / f"{name}.toml"), "--port", str(free_port())]
        nodes.append(Node(procs, name, "coordinator", serve, ready=work / f"{name}.ready.json"))
        urls.append(f"http://127.0.0.1:{serve[-1]}")
    nodes[0].start()
    for node in nodes[1:]:
        node.start(wait=False)
        wait_for(lambda n=node: "standing by" in n.procs.log(n.name), 120)  # type: ignore[misc]
    return nodes, urls


def soak(
    minutes: float,
    miners: int,
    hostile: list[str],
    interval_s: float,
    seed: int,
    work: Path,
    replicas: int = 1,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    settings = {**SETTINGS, "data": {**SETTINGS["data"], "corpus": str(corpus(work))}}
    if cluster is not None:
        settings.update(cluster.settings)
    procs = Processes(work / "logs", env={"GRADPOOL_LOG_FORMAT": "json"})
    servers, urls = coordinators(procs, settings, work, replicas)
    url = ",".join(urls)  # the nodes know every process
    keys: dict[str, str] = {}
    nodes = list(servers)
    roster = [(f"miner-{i}", None) for i in range(miners)] + [(f"{k}-0", k) for k in hostile]
    for name, kind in roster:
        key = work / "keys" / f"{name}.pem"
        save_key(generate_key(), key)
        keys[name] = public_key_hex(load_key(key))
        cheat = [] if kind is None else ["--adversary", kind]
        where = ["--key", str(key), "--state-dir", str(work / "miners" / name), "--threads", "1"]
        mine = ["mine", "--coordinator", url, *where, *cheat]
        nodes.append(Node(procs, name, "miner" if kind is None else "hostile", mine))
    where = [
        "--key",
        str(work / "keys" / "validator.pem"),
        "--create-key",
        "--state-dir",
        str(work / "validator"),
    ]
    nodes.append(
        Node(procs, "validator", "validator", ["validate", "--coordinator", url, *where, "--threads", "1"])
    )
    for node in nodes[len(servers) :]:
        node.start()
    checks, kills = Checks(SETTINGS["model"]), {"coordinator": 0, "miner": 0, "validator": 0}
    if replicas > 1:
        kills |= {"leader": 0, "replica": 0, "postgres": 0}
    failover_s: list[float] = []
    t0 = time.time()
    end = t0 + 60 * minutes
    turn = 0
    next_kill = t0 + rng.uniform(0.5, 1.5) * interval_s
    http = Replicas(urls)
    at_last_kill = 0  # the newest version seen when the last kill came
    while time.time() < end:
        checks.poll_if_up(http)
        for node in nodes:  # nothing may stop by itself
            if (code := node.exited()) is not None:
                checks.violation(f"{node.name} exited by itself (exit code {code})")
                node.start(wait=replicas == 1)
        if cluster is not None and not kills.get("postgres", 1) and time.time() > t0 + 30 * minutes:
            log(f"{time.time() - t0:6.1f} s: restart PostgreSQL")
            cluster.postgres.stop()
            time.sleep(rng.uniform(0.5, 2.0))
            cluster.postgres.start()
            kills["postgres"] += 1
        if time.time() >= next_kill:
            if turn % 2 == 0:
                # replicas: the leader two times in three, else another (its standby, or a dead one)
                leader = http.leader()
                pick = leader if leader is not None and (replicas == 1 or rng.random() < 0.67) else None
                if pick is None:
                    pick = rng.choice([i for i in range(replicas) if i != leader] or [0])
                victim = servers[pick]
                kind = "coordinator" if replicas == 1 else "leader" if pick == leader else "replica"
            else:
                victim = rng.choice([n for n in nodes[len(servers) :] if n.kind != "hostile"])
                kind = victim.kind
            turn += 1
            log(f"{time.time() - t0:6.1f} s: SIGKILL {victim.name} ({kind})")
            victim.kill()
            at_last_kill = max(checks.versions, default=0)
            killed = time.time()
            kills[kind] += 1
            if kind == "leader":  # another takes over: how long until one answers again
                if wait_for(lambda: http.leader() is not None, 120):
                    failover_s.append(round(time.time() - killed, 2))
                else:
                    checks.violation(f"no coordinator process answered within 120 s of killing {victim.name}")
            time.sleep(rng.uniform(0.2, 3.0))
            victim.start(wait=replicas == 1)
            next_kill = time.time() + rng.uniform(0.5, 1.5) * interval_s
        time.sleep(1.0)
    settle_s = settle(checks, http, at_last_kill)
    for node in nodes[len(servers) :]:
        procs.stop(node.name, grace_s=20)
    wall = [r["wall_s"] for r in http.get("/v1/reports").json()]
    grace = max(60.0, 4 * (sorted(wall)[len(wall) // 2] if wall else 15.0))
    summary = checks.final(http, nodes, keys, grace, end)
    http.close()
    procs.stop_all(grace_s=20)
    out = {
        "minutes": minutes,
        "kills": kills,
        **summary,
        "settle_s": settle_s,
        "violations": checks.violations,
    }
    if replicas > 1:
        out |= {"replicas": replicas, "store": "postgres", "failover_s": failover_s}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--miners", type=int, default=4, help="honest miners")
    p.add_argument("--hostile", default="lutscale,signflip", help="comma-separated --adversary kinds")
    p.add_argument("--interval-s", type=float, default=15.0, help="mean time between kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--replicas", type=int, default=1, help="coordinator processes on one store (2+: postgres)"
    )
    p.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--lease-s", type=float, default=10.0, help="replicas: [cluster] lease_s")
    p.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    hostile = [k for k in args.hostile.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="gradpool-chaos-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(work, args.lease_s) if args.store == "postgres" or args.replicas > 1 else None
        try:
            result = soak(
                args.minutes, args.miners, hostile, args.interval_s, args.seed, work, args.replicas, cluster
            )
        finally:
            if cluster is not None:
                cluster.close()
    if args.json:
        print(json.dumps(result))
    else:
        log(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["violations"] else 0)
