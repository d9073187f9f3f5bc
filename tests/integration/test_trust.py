"""Trust both ways: a miner believes only what the coordinator's pinned key signed. A man in the middle on
127.0.0.1 (tests/helpers/proxy.py) rewrites, one kind at a time, the published update, the checkpoint, the
round announcement, the data and the coordinator's identity: the miner stops with a one-line error and
applies nothing; through the honest path the same miner keeps mining. ``gradpool audit`` verifies the
whole history of that coordinator through its URL, and of the state directory it leaves, and names the
version where one changed byte breaks it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from gradpool.audit import RemoteSource, StateSource, audit
from gradpool.processes import Processes
from protocol.history import sign
from protocol.signing import generate_key, public_key_hex
from protocol.wire import RunInfo
from tests.helpers.cli import gradpool
from tests.helpers.miners import mine_args
from tests.helpers.proxy import Proxy, flip_byte

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a coordinator and miner processes


def impostor(body: bytes) -> bytes:
    """/v1/info as another coordinator, with a key of its own, would answer it."""
    key = generate_key()
    info = RunInfo.model_validate_json(body).model_copy(update={"coordinator_key": public_key_hex(key)})
    info = info.model_copy(update={"signature": sign(key, "info", info.signed_fields())})
    return info.model_dump_json().encode()


def next_round(body: bytes) -> bytes:
    answer = json.loads(body)
    answer["round"] += 1
    return json.dumps(answer).encode()


def rescaled(body: bytes) -> bytes:
    """A round's record with its first upload's clip scale changed: a validator would evaluate it wrong."""
    record = json.loads(body)
    record["submissions"][0]["scale"] = 0.5
    return json.dumps(record).encode()


def saved_version(state: Path) -> str:
    with safe_open(str(state / "miner-state.safetensors"), "pt") as f:
        return str(f.metadata()["version"])


def test_a_man_in_the_middle_is_refused_and_the_history_audits(
    tmp_path: Path, live_coordinator: Callable[..., Any]
) -> None:
    procs = Processes(tmp_path / "logs")
    state = tmp_path / "m-state"
    with live_coordinator() as server, Proxy(server.url) as proxy:

        def mine(name: str, *extra: str, state_dir: Path = state, key: str = "m") -> tuple[int, str]:
            args = mine_args(proxy.url, tmp_path / f"{key}.pem", state_dir)
            code = procs.start(name, [*args, "--max-rounds", "1", *extra]).wait(timeout=120)
            return code, procs.log(name)

        code, log = mine("honest-0")
        assert code == 0 and "round 0: upload taken" in log, log
        assert "pinned the coordinator's key" in log
        server.wait_rounds(1)
        assert saved_version(state) == "0"

        tampered: list[tuple[str, Callable[[bytes], bytes], str, Path]] = [
            (r"/v1/versions/\d+/update", flip_byte, "the update of version 1 does not match", state),
            (r"/v1/checkpoint", flip_byte, "does not match its signed record", tmp_path / "fresh"),
            (r"/v1/round", next_round, "signature of its round answer does not verify", state),
            (r"/v1/data", flip_byte, "signature of its data answer does not verify", state),
            (r"/v1/info", impostor, "the coordinator's key changed from", state),
        ]
        for i, (path, change, message, state_dir) in enumerate(tampered):
            proxy.rewrite = {path: change}
            code, log = mine(f"tampered-{i}", state_dir=state_dir)
            last = log.strip().splitlines()[-1]
            assert code == 1 and "refused the coordinator's answer" in last and message in last, (path, log)
            assert "Traceback" not in log and "upload taken" not in log, path
        assert saved_version(state) == "0"  # nothing applied, nothing trained
        assert not (tmp_path / "fresh" / "miner-state.safetensors").exists()

        proxy.rewrite = {r"/v1/rounds/\d+": rescaled}  # what a validator evaluates
        validate = ["validate", "--coordinator", proxy.url, "--key", str(tmp_path / "v.pem"), "--create-key"]
        validate += ["--state-dir", str(tmp_path / "v-state"), "--threads", "1", "--max-rounds", "1"]
        assert procs.start("validator", validate).wait(timeout=120) == 1, procs.log("validator")
        last = procs.log("validator").strip().splitlines()[-1]
        assert "refused the coordinator's answer" in last and "uploads answer does not verify" in last, last

        proxy.rewrite = {}
        wrong = public_key_hex(generate_key())
        code, log = mine("wrong-key", "--coordinator-key", wrong, state_dir=tmp_path / "w", key="w")
        assert code == 1 and f"not the pinned {wrong}" in log.strip().splitlines()[-1], log
        code, log = mine("honest-1")
        assert code == 0 and "round 1: upload taken" in log, log

        server.wait_rounds(2)
        result = audit(RemoteSource(proxy.url))
        assert result.ok and result.versions == 3 and result.head == 2, result
        proxy.rewrite = {r"/v1/versions/2/update": flip_byte}
        bad = gradpool("audit", "--coordinator", proxy.url)
        assert bad.returncode == 1, bad.stdout
        assert bad.stderr.startswith("error: version 2 (record 2): the published update's sha"), bad.stderr
    audit_the_state_directory(tmp_path / "coordinator")


def audit_the_state_directory(state: Path) -> None:
    """The state directory the network left (as ``make demo`` leaves one, which it audits too): it
    verifies; one changed byte of a published update, of a signed record or of the versions table fails,
    naming the version; a rollback is a signed record the audit follows."""
    good = gradpool("audit", "--state-dir", str(state))
    assert good.returncode == 0 and "verifies: 3 records (3 versions, 0 rollbacks)" in good.stdout, good

    db = sqlite3.connect(state / "state.db")
    update = db.execute("SELECT update_sha FROM versions WHERE version = 2").fetchone()[0]
    blob = state / "blobs" / update[:2] / update
    original = blob.read_bytes()
    blob.write_bytes(flip_byte(original))
    broken = audit(StateSource(state, None))
    assert not broken.ok and broken.failure["version"] == 2, broken
    blob.write_bytes(original)

    record = db.execute("SELECT record FROM history WHERE seq = 2").fetchone()[0]
    db.execute("UPDATE history SET record = ? WHERE seq = 2", (record.replace('"round":1', '"round":0'),))
    db.commit()
    broken = audit(StateSource(state, None))
    assert not broken.ok and broken.failure["version"] == 2 and "signature" in str(broken.failure), broken
    db.execute("UPDATE history SET record = ? WHERE seq = 2", (record,))
    db.execute("UPDATE versions SET param_hash = ? WHERE version = 1", ("0" * 64,))
    db.commit()
    broken = audit(StateSource(state, None))
    assert not broken.ok and broken.failure["version"] == 1 and "versions table" in str(broken.failure)
    db.execute("UPDATE versions SET param_hash = ? WHERE version = 1", (signed_hash(state, 1),))
    db.commit()
    db.close()

    rolled = gradpool("coordinator", "rollback", "--state-dir", str(state), "--to-version", "1")
    assert rolled.returncode == 0, rolled.stderr
    again = gradpool("audit", "--state-dir", str(state), "--json")
    result = json.loads(again.stdout)
    assert again.returncode == 0 and result["rollbacks"] == 1 and result["head"] == 1, again


def signed_hash(state: Path, version: int) -> str:
    """The parameter hash of ``version`` as its signed record has it."""
    with sqlite3.connect(state / "state.db") as db:
        record = db.execute("SELECT record FROM history WHERE version = ? AND kind = 'version'", (version,))
        return str(json.loads(record.fetchone()[0])["param_hash"])
