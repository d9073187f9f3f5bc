"""The coordinator killed with SIGKILL during intake and during aggregation, in synchronous and in overlapped
rounds, loses nothing and publishes each version exactly once; every checkpoint it serves matches its
hash."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.publishing.publisher import Downlink
from coordinator.settings import PublishSettings
from gradpool.processes import Processes
from node.client import CoordinatorClient
from protocol.codec import PayloadHeader, SparseLoCoCodec
from protocol.codec.accumulate import aggregate
from protocol.model import build_model
from protocol.params import apply_update, load_checkpoint, param_spec, params_hash
from protocol.signing import generate_key
from tests.helpers.held_coordinator import start_held_coordinator
from tests.helpers.waiting import wait_until

SPEC = param_spec(build_model("tiny"))


def start(
    procs: Processes, state: Path, corpus: Path, extra: dict[str, str] | None = None, held: bool = False
) -> str:
    """A coordinator process; ``held``: one whose closes never commit (tests/helpers/held_coordinator.py),
    to be killed mid-close. The payloads are random: evaluated by their effect on the loss, they could be
    refused, so the evaluation is off. Synchronous rounds unless ``extra`` says otherwise."""
    env = {
        "GRADPOOL_ROUNDS__MIN_QUORUM": "2",
        "GRADPOOL_ROUNDS__DEADLINE_S": "600",
        "GRADPOOL_ROUNDS__OVERLAP": "false",
        "GRADPOOL_DATA__EVAL_EVERY": "20",
        "GRADPOOL_DATA__EVAL_SEQUENCES": "16",
        "GRADPOOL_VALIDATION__BUILTIN": "false",
        **(extra or {}),
    }
    if held:
        return start_held_coordinator(procs, state, corpus, env)
    args = ["--state-dir", str(state), "--corpus", str(corpus), "--port", "0"]
    return procs.start_coordinator(args, state.parent / "ready.json", env=env, timeout_s=120)


def payload(seed: int, round_: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in SPEC}
    header = PayloadHeader(format_version=1, codec="sparseloco", round=round_, base_version=0)
    return SparseLoCoCodec().encode(delta, SPEC, header)[0]


def wait_status(client: CoordinatorClient, status: str, round_: int, timeout_s: float = 60) -> None:
    def reached() -> bool:
        info = client.round()
        return info.status == status and info.round == round_

    wait_until(reached, timeout_s, f"round {round_} to be {status}")


def test_sigkill_during_intake_and_during_aggregation(tmp_path: Path, corpus_file: Path) -> None:
    state, procs = tmp_path / "state", Processes(tmp_path / "logs")
    keys = [generate_key(), generate_key()]
    bodies = [payload(1), payload(2)]
    url = start(procs, state, corpus_file)
    try:
        a, b = (CoordinatorClient(url, k) for k in keys)
        a.register()
        b.register()
        version0 = load_checkpoint(a.checkpoint(0)[1], SPEC)[0]
        assert not a.submit(0, bodies[0]).duplicate
        procs.kill("coordinator")  # during intake: one upload taken, the round still open

        url = start(procs, state, corpus_file, held=True)
        a, b = (CoordinatorClient(url, k) for k in keys)
        assert a.submit(0, bodies[0]).duplicate, "the accepted upload must survive the kill"
        b.submit(0, bodies[1])
        wait_status(a, "aggregating", 0)
        procs.kill("coordinator")  # during aggregation, before the new version is committed

        url = start(procs, state, corpus_file)
        a = CoordinatorClient(url, keys[0])
        wait_status(a, "open", 1)
        info = a.version(1)
        assert a.round().version == 1
        served_version, ckpt = a.checkpoint()
        served = load_checkpoint(ckpt, SPEC)[0]
        audit = a.http.get(f"{url}/v1/rounds/0/audit").json()
        missing = a.http.get(f"{url}/v1/versions/2")
    finally:
        procs.stop_all(grace_s=30)
    assert served_version == 1 and params_hash(served, SPEC) == info.param_hash
    assert missing.status_code == 404, "a version is published exactly once"
    assert sorted(r["status"] for r in audit) == ["accepted", "accepted"]
    codec = SparseLoCoCodec()
    expected = dict(version0)
    # the default downlink: the aggregate, compressed with the coordinator's (empty) error feedback
    downlink = Downlink(PublishSettings(), codec, SPEC)
    _, applied, _ = downlink.step(aggregate([codec.decode(body, SPEC)[1] for body in bodies], SPEC))
    apply_update(expected, applied)
    assert params_hash(expected, SPEC) == info.param_hash, "both uploads are in version 1, once each"


def test_sigkill_while_an_overlapped_round_closes_loses_neither_round(
    tmp_path: Path, corpus_file: Path
) -> None:
    """Overlapped rounds: round 1 takes uploads (trained from version 0) while round 0 is being closed. A
    SIGKILL then loses neither round's uploads: after the restart round 0 publishes version 1 once, and
    round 1's uploads, applied to version 1, publish version 2."""
    state, procs = tmp_path / "state", Processes(tmp_path / "logs")
    keys = [generate_key(), generate_key()]
    overlap = {"GRADPOOL_ROUNDS__OVERLAP": "true"}
    url = start(procs, state, corpus_file, extra=overlap, held=True)
    try:
        a, b = (CoordinatorClient(url, k) for k in keys)
        a.register()
        b.register()
        a.submit(0, payload(1))
        b.submit(0, payload(2))
        wait_status(a, "open", 1)  # round 0 closing (held before its commit), round 1 open behind it
        now = a.round()
        assert now.closing == 0 and now.version == 0
        a.submit(1, payload(3, round_=1))
        b.submit(1, payload(4, round_=1))
        procs.kill("coordinator")

        url = start(procs, state, corpus_file, extra=overlap)
        a = CoordinatorClient(url, keys[0])
        now = a.round(closed=1, wait_s=60)  # round 1 closed, not only begun
        assert now.round >= 2 and now.closing is None, f"round 1 never closed: {now}"
        infos = [a.version(v) for v in (1, 2)]
        served = {v: load_checkpoint(a.checkpoint(v)[1], SPEC)[0] for v in (1, 2)}
        audits = [a.http.get(f"{url}/v1/rounds/{r}/audit").json() for r in (0, 1)]
        missing = a.http.get(f"{url}/v1/versions/3")
    finally:
        procs.stop_all(grace_s=30)
    assert missing.status_code == 404, "each round publishes exactly one version"
    for audit in audits:  # round 1's uploads, taken before the kill, are in its audit
        assert sorted(r["status"] for r in audit) == ["accepted", "accepted"], audit
    for v, info in zip((1, 2), infos, strict=True):
        assert params_hash(served[v], SPEC) == info.param_hash, f"checkpoint {v} matches its hash"
    assert infos[0].param_hash != infos[1].param_hash
