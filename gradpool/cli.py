"""The one command line: ``gradpool coordinator | mine | validate | simulate | status | audit | keygen``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gradpool.config import ConfigError, load_settings, setup_logging
from gradpool.console import ConfigOpt, fail, refusals_text
from gradpool.coordinator_commands import certs, migrate, rollback
from gradpool.model_commands import export, generate, tokenizer_app
from gradpool.node_commands import CaCertOpt, CoordinatorKeyOpt, mine, validate
from gradpool.serving import serve_coordinator
from protocol.codec import CODEC_NAMES
from protocol.model import PRESETS
from protocol.wire import HEADER_LEADER, HEADER_REPLICA

if TYPE_CHECKING:
    import httpx

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="gradpool: train one language model across many untrusted machines.",
)
coordinator_app = typer.Typer(no_args_is_help=True, help="Run the coordinator service.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(tokenizer_app, name="tokenizer")
for command in (mine, validate, export, generate):
    app.command()(command)
for maintenance in (migrate, rollback, certs):
    coordinator_app.command()(maintenance)
log = logging.getLogger("gradpool")
CORPUS_HELP = ".txt/.md/.jsonl/.parquet/.bin file or folder (default: the Python standard library)"
TOKENIZER_HELP = "'byte', or a tokenizer.json (gradpool tokenizer train)"
MODEL_HELP = f"a preset: {', '.join(PRESETS)} (a custom one: a [model] table in --config)"
CODEC_HELP = ", ".join(CODEC_NAMES)
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


@app.command()
def keygen(
    out: Annotated[list[Path], typer.Option("--out", help="where to write the PEM private key (repeatable)")],
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="keep a key that is already there")] = False,
) -> None:
    """Create an Ed25519 identity; prints the public key (the node's identity)."""
    from protocol.signing import generate_key, load_key, public_key_hex, save_key

    for path in out:
        if path.exists():
            if not exist_ok:
                fail(f"{path} already exists (use --exist-ok to keep it)")
            try:
                key = load_key(path)
            except (OSError, ValueError) as e:
                fail(str(e))
        else:
            key = generate_key()
            try:
                save_key(key, path)
            except OSError as e:
                fail(f"cannot write {path}: {e.strerror}")
        typer.echo(f"{public_key_hex(key)}  {path}")


@coordinator_app.command("serve")
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port (0: any free port)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where state, blobs and data live")] = None,
    corpus: Annotated[Path | None, typer.Option(help=CORPUS_HELP)] = None,
    tokenizer: Annotated[str | None, typer.Option(help=TOKENIZER_HELP)] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    ready_file: Annotated[Path | None, typer.Option(help="write {'url': ...} here once listening")] = None,
    device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="serve HTTPS with this certificate (PEM)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="the certificate's private key (PEM)")] = None,
) -> None:
    """Serve the coordinator: rounds, intake, aggregation, publishing."""
    from coordinator.settings import CoordinatorSettings

    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "state_dir": state_dir,
        "model": model,
        "device": device,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
    }
    data = {k: v for k, v in {"corpus": corpus, "tokenizer": tokenizer}.items() if v is not None}
    if data:
        overrides["data"] = data
    try:
        settings = load_settings(CoordinatorSettings, config, overrides)
    except ConfigError as e:
        fail(str(e))
    setup_logging(settings.log_level, settings.log_format)
    if settings.data.corpus is not None and not settings.data.corpus.exists():
        fail(f"corpus path {settings.data.corpus} does not exist")
    asyncio.run(serve_coordinator(settings, ready_file))


@app.command()
def status(
    coordinator: Annotated[
        str, typer.Option(help="the coordinator's URL; several, comma-separated: replicas, tried in turn")
    ] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status JSON")] = False,
    ca_cert: CaCertOpt = None,
) -> None:
    """Print the network's state: round, version, miners, recent held-out losses, the leaderboard (and,
    where the evaluation is shared, each validator's record)."""
    from node.errors import tls_context

    try:
        verify = tls_context(ca_cert)
    except OSError as e:  # an unreadable CA file
        fail(f"cannot read the CA certificate {ca_cert}: {e}", 1)
    url, response, data, failures = _first_status(coordinator, verify)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    r, run = data["round"], data["run"]
    replica, leader = (response.headers.get(h) for h in (HEADER_REPLICA, HEADER_LEADER))
    who = ""
    if leader:
        who = f" (leader {leader})" if replica == leader else f" (replica {replica}, leader {leader})"
    earlier = f" ({len(failures)} before it did not answer)" if failures else ""
    typer.echo(f"answered by {url}{earlier}{who}")
    typer.echo(f"run {run['run_id']}: model {run['model']}, codec {run['codec']['name']}")
    typer.echo(
        f"round {r['round']} ({r['status']}), version {r['version']}, "
        f"{r['submissions']}/{r['expected']} uploads, {data['miners']} miners registered"
    )
    typer.echo(f"initial held-out loss {data['initial_eval_loss']:.4f}")
    for row in data["rounds"][-10:]:
        loss = "n/a" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        typer.echo(
            f"  round {row['round']:>4}  version {row['version']:>4}  loss {loss}  "
            f"accepted {row['accepted']}  rejected {row['rejected']}"
        )
    if data.get("leaderboard"):
        _print_leaderboard(data["leaderboard"])
    if run.get("evaluation", {}).get("assign"):  # the evaluation shared among validators: their records
        _print_validators(url, verify)


def _first_status(
    coordinator: str, verify: ssl.SSLContext
) -> tuple[str, httpx.Response, dict[str, Any], list[str]]:
    """The first of the comma-separated URLs that answers ``/v1/status`` with JSON: its URL, the answer and
    its JSON, and what each URL before it said instead."""
    import httpx

    failures: list[str] = []
    for url in [u.strip().rstrip("/") for u in coordinator.split(",") if u.strip()]:
        try:
            response = httpx.get(f"{url}/v1/status", timeout=10.0, verify=verify)
            response.raise_for_status()
            return url, response, response.json(), failures
        except (httpx.HTTPError, ValueError) as e:
            failures.append(f"{url}: {e}")
    fail(f"cannot read status from {coordinator}: {'; '.join(failures) or 'no URL given'}", 1)


def _print_leaderboard(entries: list[dict[str, Any]]) -> None:
    typer.echo("leaderboard (score: the mean round score less its standard error; see the README)")
    cols = ["miner", "score", "mean", "+-", "gain", "own>other", "rounds", "missed", "refused"]
    widths = [-16, 8, 7, 5, 8, 9, 6, 6, 7]
    names = [f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)]
    typer.echo("  " + " ".join(names) + "  why")
    for x in entries:
        cells = [
            f"{x['miner'][:16]:<16}",
            f"{x['score']:>8.4f}",
            f"{x.get('score_mean', 0):>7.3f}",
            f"{x.get('score_stderr', 0):>5.2f}",
            f"{x['gain_avg']:>8.4f}",
            f"{x['assigned_avg']:>9.2f}",
            f"{x['rounds_contributed']:>6}",
            f"{x.get('rounds_missed', 0):>6}",
            f"{x['rounds_refused']:>7}",
        ]
        typer.echo("  " + " ".join(cells) + f"  {refusals_text(x)}")


def _print_validators(url: str, verify: ssl.SSLContext) -> None:
    """Each validator's record, where the evaluation is shared among validators."""
    import httpx

    try:
        records = httpx.get(f"{url}/v1/validators", timeout=10.0, verify=verify).json()["validators"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        typer.echo(f"validators: cannot read their records ({e})")
        return
    typer.echo("validators (uploads assigned: agreed, outvoted, missed)")
    for v in records:
        drawn = "benched" if v["benched"] else "drawn"
        typer.echo(
            f"  {v['validator'][:16]}  assigned {v['assigned']:>5}  agreed {v['agreed']:>5}  "
            f"outvoted {v['outvoted']:>4}  missed {v['missed']:>4}  last round {v['last_round']}  {drawn}"
        )


@app.command()
def audit(
    coordinator: Annotated[str | None, typer.Option(help="a running coordinator's URL")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="or a coordinator's state directory")] = None,
    coordinator_key: CoordinatorKeyOpt = None,
    ca_cert: CaCertOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    """Verify a run's whole signed history: every record and link, and every published update, checkpoint
    and parameter hash by replaying the model from version 0. Exit code 0 only when all of it verifies."""
    from gradpool.audit import RemoteSource, Source, SourceError
    from gradpool.audit import audit as run_audit

    if (coordinator is None) == (state_dir is None and config is None):
        fail("give --coordinator URL, or --state-dir DIR (with --config FILE when it has one)")
    source: Source
    try:
        if coordinator is not None:
            source = RemoteSource(coordinator, ca_cert)
        else:
            source = _state_source(state_dir, config, coordinator_key)
    except SourceError as e:
        fail(str(e), 1)
    except (OSError, ValueError) as e:
        fail(f"cannot read the coordinator's state: {e}", 1)
    try:
        result = run_audit(source, coordinator_key)
    finally:
        source.close()
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=1))
    elif result.ok:
        typer.echo(
            f"the history of run {result.run_id} verifies: {result.records} records ({result.versions} "
            f"versions, {result.rollbacks} rollbacks), head version {result.head}, every update replayed "
            f"and {result.checkpoints} kept checkpoints checked; coordinator key {result.key}"
        )
        if coordinator_key is None:
            typer.echo(
                "(the key is the one the source gives: compare it with the key the operator publishes)"
            )
    if not result.ok:
        f = result.failure
        where = "the history" if f["version"] is None else f"version {f['version']} (record {f['seq']})"
        fail(f"{where}: {f['reason']}", 1)


def _state_source(state_dir: Path | None, config: Path | None, key: str | None) -> Any:
    from coordinator.settings import CoordinatorSettings
    from gradpool.audit import StateSource
    from protocol.signing import load_key, public_key_hex

    if config is None:
        assert state_dir is not None
        return StateSource(state_dir, key)
    try:
        s = load_settings(CoordinatorSettings, config, {"state_dir": state_dir})
    except ConfigError as e:
        fail(str(e))
    if key is None and s.identity.key is not None:
        key = public_key_hex(load_key(s.identity.key))
    return StateSource(s.state_dir, key, s.blobs)


@app.command()
def simulate(
    miners: Annotated[int, typer.Option(min=1, max=64, help="number of honest miner processes")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="rounds to train")] = 10,
    out: Annotated[Path, typer.Option(help="report, logs and state go here")] = Path("runs/simulate"),
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "tiny",
    corpus: Annotated[Path | None, typer.Option(help=CORPUS_HELP)] = None,
    tokenizer: Annotated[str, typer.Option(help=TOKENIZER_HELP)] = "byte",
    codec: Annotated[str, typer.Option(help=CODEC_HELP)] = "sparseloco",
    inner_steps: Annotated[int | None, typer.Option(help="H, inner steps per round")] = None,
    max_tokens: Annotated[int, typer.Option(help="corpus tokens to use")] = 4_000_000,
    timeout_s: Annotated[float, typer.Option(help="give up after this long")] = 1800.0,
    adversary: Annotated[
        list[str] | None,
        typer.Option(
            help="add COUNT cheating miners of KIND, as KIND:COUNT (repeatable); see node/adversary.py"
        ),
    ] = None,
    overlap: Annotated[
        bool | None,
        typer.Option("--overlap/--sync", help="overlapped or synchronous rounds (default: the config's)"),
    ] = None,
    validators: Annotated[
        int,
        typer.Option(min=0, max=16, help="validator processes beside the miners, named to the coordinator"),
    ] = 0,
    assign: Annotated[
        bool,
        typer.Option(
            "--assign/--no-assign",
            help="with --validators: the coordinator shares its evaluation among them ([validation] assign)",
        ),
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Run a coordinator, N miners and any validators as processes on 127.0.0.1; print a row per round;
    write a report."""
    from gradpool.simulate import SimulationFailed, parse_adversaries
    from gradpool.simulate import simulate as run_simulation

    try:
        report = run_simulation(
            adversaries=parse_adversaries(adversary or []),
            miners=miners,
            rounds=rounds,
            out=out,
            model=model,
            corpus=corpus,
            tokenizer=tokenizer,
            codec=codec,
            inner_steps=inner_steps,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            overlap=overlap,
            config=config,
            echo=typer.echo,
            validators=validators,
            assign=assign,
        )
    except SimulationFailed as e:
        fail(str(e), 1)
    except ConfigError as e:
        fail(str(e))
    typer.echo(
        f"held-out loss {report['initial_eval_loss']:.4f} -> {report['final_eval_loss']:.4f}; "
        f"compute utilisation {report['utilisation']:.2f}; "
        f"report in {out / 'report.json'}, plot in {out / 'loss.png'}"
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
