"""An evaluation shared among validators (``[validation] assign``): real validators (node/validator.py,
in threads, through the coordinator's API) evaluate only the uploads each was assigned; one that lies is
outvoted by the coordinator's own evaluation and its record shows it; one that never answers misses its
tasks, the coordinator evaluates what it left, the round is scored all the same, and both are benched."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from typer.testing import CliRunner

from coordinator.rounds.sharing import BENCH_AFTER, agree
from coordinator.settings import CoordinatorSettings
from gradpool.cli import app
from node.settings import ValidatorSettings
from node.validator import Validator
from protocol.evaluation import LOSS_FIELDS, Losses
from protocol.signing import public_key_hex
from protocol.wire import Verdict, Verdicts
from tests.helpers.pool import (
    EVAL,
    RECIPE,
    Miner,
    OpenPool,
    Pool,
    assert_error,
    encode,
    fixed_miner,
    node_client,
    trained_delta,
)
from tests.helpers.waiting import wait_until

LIE = 0.5  # nats the liar takes off each loss after an update: a gain far beyond the tolerance


def key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([100 + i]) * 32)


HONEST, LIAR, DEAD = (key(i) for i in range(3))
VALIDATORS = [public_key_hex(k) for k in (HONEST, LIAR, DEAD)]
SHARED = {**EVAL, "assign": True, "validators": VALIDATORS, "redundancy": 2, "verdict_deadline_s": 5.0}


class Lying:
    """A validator's client that posts better losses after each update than it measured, and a verdict on
    an upload it was not assigned."""

    def __init__(self, client: Any, unassigned: Callable[[], str | None]) -> None:
        self.client, self.unassigned = client, unassigned

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def post_verdicts(self, round_: int, verdicts: Verdicts) -> Any:
        lies = [v.model_copy(update={"own_after": v.own_after - LIE}) for v in verdicts.verdicts]
        other = self.unassigned()
        if other is not None:
            lies.append(Verdict.model_validate({**lies[0].model_dump(), "miner": other}))
        receipt = self.client.post_verdicts(round_, Verdicts(verdicts=lies))
        assert receipt.recorded == len(verdicts.verdicts)  # the unassigned one is ignored
        return receipt


def validator(pool: Pool, k: Ed25519PrivateKey, tmp: Path) -> Validator:
    client = node_client(pool, k)
    settings = ValidatorSettings(state_dir=tmp, device="cpu", coordinator="http://testserver")
    return Validator(settings, client, client.info(), threading.Event())


def evaluate(v: Validator, round_: int, out: dict[str, Any]) -> None:
    try:
        while (got := v.validate_round(round_)) is None:
            v.stop.wait(0.1)
        out[v.pubkey] = got
    except Exception as e:  # reported by the test's thread
        out[v.pubkey] = e


def rows(pool: Pool, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    uri = f"file:{pool.settings.state_dir / 'state.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql, args).fetchall()


def shared_round(
    pool: Pool, round_: int, miners: list[Miner], validators: list[Validator], shares: dict[str, set[str]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """Every miner's honest upload; once the round's version is out, its draw, each validator's share and
    its evaluation of it (in threads, as validators run beside the coordinator); returns the draw, what
    each validator measured, and the round's uploads once scored."""
    version = pool.latest()["version"]
    for m in miners:
        body = encode(trained_delta(pool, m.pubkey, round_, version), round_, version)[0]
        assert m.upload(round_, body).status_code == 200
    pool.wait_for_round(round_)
    path = f"/v1/rounds/{round_}/tasks"

    def draw() -> dict[str, Any] | None:  # made once the version is out: validators poll for it as well
        got: dict[str, Any] = pool.client.get(path).json()
        return None if got["status"] == "waiting" else got

    drawn = wait_until(draw, 30, f"round {round_}'s draw")
    for v in validators:
        shares[v.pubkey] = set(pool.client.get(path, params={"validator": v.pubkey}).json()["assigned"])
    out: dict[str, Any] = {}
    threads = [threading.Thread(target=evaluate, args=(v, round_, out)) for v in validators]
    for t in threads:
        t.start()
    scored = pool.wait_scored(round_, timeout_s=60)
    for t in threads:
        t.join(timeout=60)
    assert pool.client.get(path).json()["status"] == "settled"
    for v in validators:
        assert not isinstance(out[v.pubkey], Exception), out[v.pubkey]
        assert set(out[v.pubkey]) == shares[v.pubkey], v.pubkey[:12]  # its share, no more
    return drawn, out, scored


def test_validators_share_the_evaluation(open_pool: OpenPool, tmp_path: Path) -> None:
    dead = public_key_hex(DEAD)
    with open_pool(recipe=RECIPE, validation=SHARED, rounds={"min_quorum": 3}) as pool:
        assert pool.client.get("/v1/info").json()["evaluation"]["assign"] is True
        assert_error(pool.client.get("/v1/rounds/7/tasks"), 404, "not_found")
        assert_error(
            pool.client.get("/v1/rounds/0/tasks", params={"validator": "xyz"}), 422, "invalid_request"
        )
        miners = [fixed_miner(pool, i) for i in range(3)]
        honest = validator(pool, HONEST, tmp_path / "honest")
        liar = validator(pool, LIAR, tmp_path / "liar")
        shares: dict[str, set[str]] = {}

        def unassigned() -> str | None:
            return next((m.pubkey for m in miners if m.pubkey not in shares.get(liar.pubkey, set())), None)

        liar.client = Lying(liar.client, unassigned)
        drawn, out, by_miner = shared_round(pool, 0, miners, [honest, liar], shares)
        records = {r["validator"]: r for r in pool.client.get("/v1/validators").json()["validators"]}
        tasks_of = {(m, who): o for m, who, o in rows(pool, "SELECT miner, validator, outcome FROM tasks")}
        posted = {(m, who) for _, m, who in rows(pool, "SELECT round, miner, validator FROM verdicts")}
        settled = {
            m: dict(zip(LOSS_FIELDS, v, strict=True))
            for m, who, *v in rows(pool, f"SELECT miner, validator, {', '.join(LOSS_FIELDS)} FROM verdicts")
            if who == "coordinator"
        }
        round_0 = {v.pubkey: set(shares[v.pubkey]) for v in (honest, liar)}

        # a second round: lying or missing in two rounds of ten, a validator is drawn no more
        shared_round(pool, 1, miners, [honest, liar], shares)
        later = {r["validator"]: r for r in pool.client.get("/v1/validators").json()["validators"]}
        exported = pool.client.get("/metrics").text
        next_draw = pool.client.app.state.run.sharing.draw(2, "salt", [m.pubkey for m in miners])  # type: ignore[attr-defined]

    # the draw: every sampled upload to two of the three validators; each evaluated its share only
    assert drawn["status"] == "assigned" and len(drawn["uploads"]) == 3, drawn
    assert all(
        len(t["validators"]) == 2 and set(t["validators"]) <= set(VALIDATORS) for t in drawn["uploads"]
    )
    assert sum(len(s) for s in round_0.values()) < 6  # the dead one had a share too: nobody evaluated all
    assert {m for m, who in posted if who == liar.pubkey} == round_0[liar.pubkey]  # unassigned: ignored

    # the round is scored: every sampled upload has the coordinator's settled verdict, the honest one's
    # where the honest validator evaluated it, never the liar's
    assert set(settled) == {m.pubkey for m in miners} and all(s["evaluated"] for s in by_miner.values())
    for m in round_0[honest.pubkey]:
        assert settled[m]["own_after"] == pytest.approx(out[honest.pubkey][m].own_after, abs=1e-4)
    for m in round_0[liar.pubkey]:
        assert settled[m]["own_after"] > out[liar.pubkey][m].own_after - LIE + LIE / 2

    # the records: the liar outvoted on each of its share, the dead one missing each of its, the honest
    # one agreeing; one round of it benches nobody, two do
    assert {o for (m, who), o in tasks_of.items() if who == liar.pubkey} == {"outvoted"}
    assert {o for (m, who), o in tasks_of.items() if who == dead} == {"missed"}
    assert {o for (m, who), o in tasks_of.items() if who == honest.pubkey} == {"agreed"}
    assert records[liar.pubkey]["outvoted"] == len(round_0[liar.pubkey])
    assert records[dead]["missed"] == 6 - sum(len(s) for s in round_0.values())
    assert records[honest.pubkey]["agreed"] == len(round_0[honest.pubkey])
    assert BENCH_AFTER == 2 and not any(r["benched"] for r in records.values())
    assert later[liar.pubkey]["outvoted"] > records[liar.pubkey]["outvoted"] and later[liar.pubkey]["benched"]
    assert later[dead]["missed"] > records[dead]["missed"] and later[dead]["benched"]
    assert not later[honest.pubkey]["benched"] and later[honest.pubkey]["outvoted"] == 0
    assert all(vs == [honest.pubkey] for vs in next_draw.values())  # the one left, for every upload
    outvoted = f'gradpool_validator_tasks_total{{outcome="outvoted",validator="{liar.pubkey[:16]}"}}'
    assert f"{outvoted} {float(later[liar.pubkey]['outvoted'])}" in exported


def test_sharing_needs_named_validators_and_is_off_by_default(
    open_pool: OpenPool, make_settings: Callable[..., CoordinatorSettings]
) -> None:
    with pytest.raises(ValidationError, match="assign needs `validators`"):
        make_settings(validation={"assign": True})
    with open_pool() as pool:
        assert_error(pool.client.get("/v1/rounds/0/tasks"), 404, "not_shared")
        assert_error(pool.client.get("/v1/validators"), 404, "not_shared")


def test_verdicts_agree_on_their_losses_within_the_tolerance_and_on_their_errors_within_a_tenth() -> None:
    x = Losses(3.0, 2.5, 3.0, 2.9, 0.02, 0.4, 0.03)
    assert agree(x, dataclasses.replace(x, own_after=2.505), 0.01)
    assert not agree(x, dataclasses.replace(x, own_after=2.4), 0.01)  # a better gain than measured
    assert not agree(x, dataclasses.replace(x, paired_margin=0.3), 0.01)
    assert agree(x, dataclasses.replace(x, paired_se=0.031), 0.01)
    assert not agree(x, dataclasses.replace(x, paired_se=0.3), 0.01)  # a margin made to look unsure
    assert not agree(x, dataclasses.replace(x, margin_se=0.05), 0.01)


def test_gradpool_status_shows_each_validators_record(live_coordinator: Callable[..., Any]) -> None:
    with live_coordinator(validation=SHARED) as server:
        shown = CliRunner().invoke(app, ["status", "--coordinator", server.url])  # the CLI, in this process
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    table = lines[lines.index("validators (uploads assigned: agreed, outvoted, missed)") + 1 :]
    assert [line.split()[0] for line in table] == sorted(v[:16] for v in VALIDATORS)
    assert all("assigned     0" in line and line.endswith("drawn") for line in table)
