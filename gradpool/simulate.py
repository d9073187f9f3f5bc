"""``gradpool simulate``: a coordinator, N miners and (``validators``) validators as separate processes on
127.0.0.1."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from gradpool.config import ConfigError, load_settings
from gradpool.console import refusals_text
from gradpool.processes import Processes, ProcessFailed, cpu_seconds

ROW = (
    "{round:>5} {version:>7} {eval_loss:>10} {accepted:>8} {rejected:>8} "
    "{bytes_up:>10} {bytes_down:>11} {model_per_miner:>15} {wall_s:>8}"
)


class SimulationFailed(Exception):
    pass


def simulate(
    *,
    miners: int,
    rounds: int,
    out: Path,
    model: str = "tiny",
    corpus: Path | None = None,
    tokenizer: str = "byte",
    codec: str = "sparseloco",
    inner_steps: int | None = None,
    max_tokens: int = 4_000_000,
    timeout_s: float = 1800.0,
    overlap: bool | None = None,
    config: Path | None = None,
    adversaries: dict[str, int] | None = None,
    echo: Callable[[str], None] = print,
    host: str = "127.0.0.1",
    wrap: Callable[[int], list[str]] | None = None,
    validators: int = 0,
    assign: bool = True,
) -> dict[str, Any]:
    """``miners`` honest miners, plus ``adversaries`` (kind -> count) cheating miners, and ``validators``
    validators, named to the coordinator, which (``assign``) shares its evaluation among them. ``host``:
    the address the coordinator listens on; ``wrap``: the command the i-th miner runs through (benchmarks
    start each miner in a network namespace of its own)."""
    from coordinator.settings import CoordinatorSettings

    out.mkdir(parents=True, exist_ok=True)
    checkers = {f"validator-{i}": _key(out / "keys" / f"validator-{i}.pem") for i in range(validators)}
    overrides = _overrides(
        out=out,
        host=host,
        model=model,
        codec=codec,
        tokenizer=tokenizer,
        corpus=corpus,
        max_tokens=max_tokens,
        miners=miners,
        nodes=miners + sum((adversaries or {}).values()),
        overlap=overlap,
    )
    if inner_steps is not None:
        overrides["recipe"] = {"inner_steps": inner_steps}
    if checkers:
        overrides["validation"] = {"validators": list(checkers.values()), "assign": assign}
    settings = load_settings(CoordinatorSettings, config, overrides)
    if settings.data.corpus is not None and not settings.data.corpus.exists():  # before starting anything
        raise SimulationFailed(f"corpus path {settings.data.corpus} does not exist")
    procs = Processes(out / "logs")
    try:
        try:
            url = procs.start_coordinator(
                ["--config", str(_toml(settings, out)), "--port", "0"], out / "coordinator.ready"
            )
        except ProcessFailed as e:
            raise SimulationFailed(str(e)) from None
        echo(f"coordinator at {url}; dashboard at {url}/")
        roster = _roster(miners, adversaries or {}, out / "keys")
        threads = str(max(1, (os.cpu_count() or 1) // (len(roster) + len(checkers))))
        for i, (name, (kind, _)) in enumerate(roster.items()):
            cheat = [] if kind == "honest" else ["--adversary", kind]
            if kind == "sybil":  # one operator: its keys share one computation
                cheat += ["--adversary-shared", str(out / "sybil")]
            key = str(out / "keys" / f"{name}.pem")
            state = str(out / "miners" / name)
            command = ["mine", "--coordinator", url, "--key", key, "--state-dir", state, "--threads", threads]
            procs.start(name, [*command, *cheat], prefix=None if wrap is None else wrap(i))
        for name in checkers:
            key, state = str(out / "keys" / f"{name}.pem"), str(out / "validators" / name)
            procs.start(name, ["validate", "--coordinator", url, "--key", key, "--state-dir", state])
        status = _watch(procs, url, rounds, timeout_s, echo, list(roster))
        _wait_scored(url, status["rounds"][-1]["round"], timeout_s=120.0)
        status["coordinator_cpu_s"] = cpu_seconds(procs.procs["coordinator"].pid)
        standings = _standings(url, roster, status)
        standings["validators"] = _validator_records(url, checkers, settings.validation.assign)
    finally:
        procs.stop_all()
    report = _report(settings, miners, status)
    report.update(standings)
    _echo_standings(report, echo)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_losses(report, out / "loss.png")
    return report


def _overrides(
    *,
    out: Path,
    host: str,
    model: str,
    codec: str,
    tokenizer: str,
    corpus: Path | None,
    max_tokens: int,
    miners: int,
    nodes: int,
    overlap: bool | None,
) -> dict[str, Any]:
    """The coordinator's settings for a simulated network, over the defaults (and the ``--config`` file).
    ``nodes``: every miner, honest or not, all from this machine's address at once."""
    from coordinator.settings import AdmissionSettings

    default = AdmissionSettings()  # the defaults, unless the network is larger
    return {
        "state_dir": out / "coordinator",
        "host": host,
        "port": 0,
        "model": model,
        "codec": {"name": codec},
        "data": {
            "max_tokens": max_tokens,
            "tokenizer": tokenizer if tokenizer == "byte" else str(Path(tokenizer).resolve()),
            **({} if corpus is None else {"corpus": corpus.resolve()}),
        },
        "rounds": {
            "min_quorum": max(1, (miners + 1) // 2),
            **({} if overlap is None else {"overlap": overlap}),
        },
        "max_catchup_versions": 64,  # a stale adversary goes back a few versions
        "admission": {
            "per_address_per_minute": max(default.per_address_per_minute, nodes),
            "per_minute": max(default.per_minute, nodes),
        },
    }


def _echo_standings(report: dict[str, Any], echo: Callable[[str], None]) -> None:
    for m in report["miners"]:
        echo(
            f"{m['name']:>16} {m['kind']:>9}  score {m['score']:+.4f}  rounds {m['rounds_contributed']:>3}"
            f"  refused {m['rounds_refused']:>3} {refusals_text(m)}"
        )
    for v in report["validators"]:
        echo(
            f"{v['name']:>16} validator  assigned {v.get('assigned', 'n/a')}  agreed {v.get('agreed', 'n/a')}"
            f"  outvoted {v.get('outvoted', 'n/a')}  missed {v.get('missed', 'n/a')}"
        )


def _roster(miners: int, adversaries: dict[str, int], keys: Path) -> dict[str, tuple[str, str]]:
    """Process name -> (kind, public key); the keys are made here so the report can name every miner."""
    names = [(f"miner-{i}", "honest") for i in range(miners)]
    names += [(f"{kind}-{j}", kind) for kind, n in adversaries.items() for j in range(n)]
    return {name: (kind, _key(keys / f"{name}.pem")) for name, kind in names}


def _key(path: Path) -> str:
    """The public key of the key file at ``path``, made first if there is none."""
    from protocol.signing import generate_key, load_key, public_key_hex, save_key

    if not path.exists():
        save_key(generate_key(), path)
    return public_key_hex(load_key(path))


def _validator_records(url: str, checkers: dict[str, str], assign: bool) -> list[dict[str, Any]]:
    """Each validator's record (``GET /v1/validators``) by name; with no shared evaluation, names only."""
    records: dict[str, dict[str, Any]] = {}
    if checkers and assign:
        with httpx.Client(base_url=url, timeout=30.0) as http:
            records = {r["validator"]: r for r in http.get("/v1/validators").json()["validators"]}
    return [{"name": name, **records.get(key, {"validator": key})} for name, key in checkers.items()]


def _wait_scored(url: str, round_: int, timeout_s: float) -> None:
    """Until the coordinator's verdicts on ``round_`` are in (overlapped rounds evaluate some uploads after
    the round's close), so that the standings count it."""
    end = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10.0) as http:
        while time.monotonic() < end and not http.get(f"/v1/rounds/{round_}").json().get("scored", True):
            time.sleep(0.25)


def _standings(url: str, roster: dict[str, tuple[str, str]], status: dict[str, Any]) -> dict[str, Any]:
    """Each miner's final leaderboard entry, and every miner's score as of the close of each round."""
    by_key = {key: (name, kind) for name, (kind, key) in roster.items()}
    with httpx.Client(base_url=url, timeout=30.0) as http:
        boards = [http.get("/v1/leaderboard", params={"round": r["round"]}).json() for r in status["rounds"]]
    final = {e["miner"]: e for e in boards[-1]["miners"]} if boards else {}
    miners = [
        {
            "name": name,
            "kind": kind,
            **final.get(
                key,
                {"miner": key, "score": None, "rounds_contributed": 0, "rounds_refused": 0, "refusals": {}},
            ),
        }
        for name, (kind, key) in roster.items()
    ]
    scores = [
        {
            "round": b["round"],
            "scores": {by_key[e["miner"]][0]: e["score"] for e in b["miners"] if e["miner"] in by_key},
        }
        for b in boards
    ]
    return {"miners": miners, "scores": scores}


def parse_adversaries(specs: list[str]) -> dict[str, int]:
    """``["noise:2", "lazy:1"]`` -> {"noise": 2, "lazy": 1}; raises ConfigError on a bad one."""
    from typing import get_args

    from node.settings import AdversaryKind

    kinds = get_args(AdversaryKind)
    out: dict[str, int] = {}
    for spec in specs:
        kind, _, count = spec.partition(":")
        if kind not in kinds or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"--adversary {spec!r}: expected KIND:COUNT with KIND one of {', '.join(kinds)}"
            )
        out[kind] = out.get(kind, 0) + int(count)
    return out


def _toml(settings: Any, out: Path) -> Path:
    """The settings as a TOML file for the coordinator process."""
    path = out / "coordinator.toml"
    path.write_text(tomli_w.dumps(json.loads(settings.model_dump_json(exclude_none=True))))
    return path


def _watch(
    procs: Processes,
    url: str,
    rounds: int,
    timeout_s: float,
    echo: Callable[[str], None],
    miner_names: list[str],
) -> dict[str, Any]:
    """A row per closed round; ``model_per_miner``: model bytes (updates, checkpoints) each miner
    downloaded, on average."""
    end = time.monotonic() + timeout_s
    names = ("round", "version", "eval_loss", "accepted", "rejected", "bytes_up", "bytes_down")
    echo(ROW.format(**{n: n for n in names}, model_per_miner="model/miner", wall_s="wall_s"))
    miners = max(1, len(miner_names))
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=10.0) as http:
        status: dict[str, Any] = http.get("/v1/status").json()
        echo(f"{'init':>5} {0:>7} {status['initial_eval_loss']:>10.4f}")
        while len(rows) < rounds:
            if time.monotonic() > end:
                done = len(rows)
                raise SimulationFailed(f"only {done} of {rounds} rounds finished within {timeout_s:.0f} s")
            dead = procs.dead()
            if "coordinator" in dead:
                raise SimulationFailed(f"the coordinator died:\n{procs.tail('coordinator')}")
            if set(miner_names) <= set(dead):
                name = miner_names[0]
                raise SimulationFailed(f"every miner died; {name}:\n{procs.tail(name)}")
            after = rows[-1]["round"] if rows else -1
            try:
                new = http.get("/v1/reports", params={"after": after}).json()
            except (httpx.HTTPError, ValueError):
                time.sleep(0.5)
                continue
            cpu = cpu_seconds(procs.procs["coordinator"].pid) if new else 0.0  # its CPU time as it closed
            for row in new[: rounds - len(rows)]:
                row["coordinator_cpu_s"] = cpu
                loss = "n/a" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
                per_miner = row.get("bytes_down_model", 0) // miners
                echo(
                    ROW.format(
                        **{
                            **row,
                            "eval_loss": loss,
                            "wall_s": f"{row['wall_s']:.2f}",
                            "model_per_miner": per_miner,
                        }
                    )
                )
                rows.append(row)
            time.sleep(0.25)
    status["rounds"] = rows
    if not any(r["accepted"] for r in rows):
        raise SimulationFailed("no update was accepted in any round")
    return status


def _report(settings: Any, miners: int, status: dict[str, Any]) -> dict[str, Any]:
    rows = status["rounds"]
    losses = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    config = json.loads(settings.model_dump_json())
    config["miners"] = miners
    return {
        "config": config,
        "initial_eval_loss": status["initial_eval_loss"],
        "rounds": rows,
        "final_eval_loss": losses[-1] if losses else status["initial_eval_loss"],
        "utilisation": utilisation(rows),
        "coordinator_cpu_s": status["coordinator_cpu_s"],  # once the last round was scored
    }


def utilisation(rows: list[dict[str, Any]]) -> float:
    """The miners' compute over the wall time, after the first round (which also builds and loads)."""
    wall = sum(r["wall_s"] for r in rows[1:])
    return sum(r["compute_s"] for r in rows[1:]) / wall if wall > 0 else 0.0


def plot_losses(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0] + [r["round"] + 1 for r in report["rounds"] if r["eval_loss"] is not None]
    ys = [report["initial_eval_loss"]] + [
        r["eval_loss"] for r in report["rounds"] if r["eval_loss"] is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(
        f"gradpool simulate: {report['config']['miners']} miners, {report['config']['model']}, "
        f"{report['config']['codec']['name']}"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["ConfigError", "Processes", "SimulationFailed", "plot_losses", "simulate"]
