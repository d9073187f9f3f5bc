"""The one command line: ``gradpool coordinator serve | mine | simulate | status | keygen``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gradpool.config import ConfigError, load_settings, setup_logging

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="gradpool: train one language model across many untrusted machines.",
)
coordinator_app = typer.Typer(no_args_is_help=True, help="Run the coordinator service.")
app.add_typer(coordinator_app, name="coordinator")
log = logging.getLogger("gradpool")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
    corpus: Annotated[
        Path | None, typer.Option(help=".txt/.md/.jsonl file or folder (default: stdlib)")
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="write {'url': ...} here once listening")] = None,
) -> None:
    """Serve the coordinator: rounds, intake, aggregation, publishing."""
    from coordinator.settings import CoordinatorSettings

    overrides: dict[str, Any] = {"host": host, "port": port, "state_dir": state_dir}
    if corpus is not None:
        overrides["data"] = {"corpus": corpus}
    try:
        settings = load_settings(CoordinatorSettings, config, overrides)
    except ConfigError as e:
        fail(str(e))
    setup_logging(settings.log_level, settings.log_format)
    if settings.data.corpus is not None and not settings.data.corpus.exists():
        fail(f"corpus path {settings.data.corpus} does not exist")
    asyncio.run(_serve(settings, ready_file))


async def _serve(settings: Any, ready_file: Path | None) -> None:
    from coordinator.app import create_app
    from coordinator.run import Run
    from coordinator.server import bound_port, make_server
    from protocol.errors import ProtocolError

    try:
        run = await asyncio.to_thread(Run, settings)
    except (ProtocolError, ValueError, OSError) as e:
        fail(str(e))
    server = make_server(create_app(settings, run=run), settings.host, settings.port)

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        url = f"http://{settings.host}:{bound_port(server)}"
        log.info("coordinator listening on %s (state in %s)", url, settings.state_dir)
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            os.replace(tmp, ready_file)

    task = asyncio.create_task(announce())
    await server.serve()
    task.cancel()


@coordinator_app.command("rollback")
def rollback(
    state_dir: Annotated[Path, typer.Option(help="the coordinator's state directory")],
    to_version: Annotated[int, typer.Option(min=0, help="the version to make current again")],
) -> None:
    """Make an earlier version current again (with the coordinator stopped); the audit trail is kept."""
    from coordinator.rollback import rollback as roll_back

    try:
        done = roll_back(state_dir, to_version)
    except (ValueError, OSError) as e:
        fail(str(e), 1)
    aside = ", ".join(map(str, done.set_aside)) or "none"
    r, v = done.closed_round, done.version
    typer.echo(f"version {v} is current again; versions set aside: {aside}; round {r} closed, round {r + 1} "
               f"opens for version {v}")  # fmt: skip


@app.command()
def mine(
    coordinator: Annotated[str | None, typer.Option(help="the coordinator's URL")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key (PEM)")] = None,
    create_key: Annotated[bool | None, typer.Option("--create-key", help="create the key if missing")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="error feedback and optimizer state")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="sequences per forward pass")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="stop after this many uploads")] = None,
    once: Annotated[bool, typer.Option("--once", help="mine one round, then exit")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    adversary: Annotated[
        str | None,
        typer.Option(
            help="simulations only: cheat as noise, scaled, signflip, copycat, stale, lazy, freerider, nan "
            "or lutscale"
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Mine: train on the coordinator's rounds and upload compressed updates."""
    from node.adversary import Adversary
    from node.client import ClientError, ProtocolMismatch, Refused
    from node.miner import Miner
    from node.settings import MinerSettings

    overrides = {
        "coordinator": coordinator,
        "key": key,
        "create_key": create_key,
        "state_dir": state_dir,
        "device": device,
        "micro_batch": micro_batch,
        "threads": threads,
        "max_rounds": 1 if once else max_rounds,
        "metrics_port": metrics_port,
        "adversary": adversary,
    }
    try:
        settings = load_settings(MinerSettings, config, overrides)
    except ConfigError as e:
        fail(str(e))
    setup_logging(settings.log_level, settings.log_format)
    _set_threads(settings.threads)
    from node.distributed import init_from_env, share

    rank, world = init_from_env()
    if rank > 0:
        _follow_rank_zero(settings)
        return
    client, info = _connect(settings)
    if world > 1:
        share(info.model_dump())
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        miner = (Miner if settings.adversary is None else Adversary)(settings, client, info, stop)
        mined = miner.run()
    except ProtocolMismatch as e:
        fail(str(e))
    except Refused as e:
        fail(f"coordinator refused this miner: {e}", 1)
    except (ClientError, ValueError, RuntimeError) as e:
        fail(str(e), 1)
    finally:
        client.close()
    log.info("stopped after %d rounds", mined)


@app.command()
def validate(
    coordinator: Annotated[str | None, typer.Option(help="the coordinator's URL")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key (PEM)")] = None,
    create_key: Annotated[bool | None, typer.Option("--create-key", help="create the key if missing")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="downloads and progress")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="stop after evaluating this many rounds")] = None,
    config: ConfigOpt = None,
) -> None:
    """Validate: evaluate each closed round's uploads and post signed verdicts to the coordinator."""
    from node.client import ClientError, ProtocolMismatch
    from node.settings import ValidatorSettings
    from node.validator import Validator

    overrides = {"coordinator": coordinator, "key": key, "create_key": create_key, "state_dir": state_dir,
                 "device": device, "threads": threads, "max_rounds": max_rounds}  # fmt: skip
    try:
        settings = load_settings(ValidatorSettings, config, overrides)
    except ConfigError as e:
        fail(str(e))
    setup_logging(settings.log_level, settings.log_format)
    _set_threads(settings.threads)
    client, info = _connect(settings)
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        done = Validator(settings, client, info, stop).run()
    except ProtocolMismatch as e:
        fail(str(e))
    except (ClientError, ValueError, RuntimeError) as e:
        fail(str(e), 1)
    finally:
        client.close()
    log.info("stopped after evaluating %d rounds", done)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _connect(settings: Any) -> tuple[Any, Any]:
    """A signed client for the node's key (created if asked) and the run's description, waiting up to
    the startup timeout for the coordinator to answer."""
    from node.client import CoordinatorClient, ProtocolMismatch, Unavailable
    from protocol.signing import generate_key, load_key, save_key

    if not settings.key.exists() and settings.create_key:
        save_key(generate_key(), settings.key)
    try:
        private = load_key(settings.key)
    except FileNotFoundError:
        fail(
            f"key file {settings.key} does not exist (create one with: gradpool keygen --out {settings.key})"
        )
    except (OSError, ValueError) as e:
        fail(f"cannot read key {settings.key}: {e}")
    client = CoordinatorClient(settings.coordinator, private, timeout_s=settings.timeout_s)
    deadline = time.monotonic() + settings.startup_timeout_s
    while True:
        try:
            return client, client.info()
        except ProtocolMismatch as e:
            fail(str(e))
        except Unavailable as e:
            if time.monotonic() >= deadline:
                fail(f"{e} (gave up after {settings.startup_timeout_s:.0f} s)", 1)
            time.sleep(1.0)


def _follow_rank_zero(settings: Any) -> None:
    """A rank other than 0 under torchrun: no network of its own; it trains what rank 0 hands it."""
    from node.distributed import follow, local_device, share
    from node.trainer import InnerTrainer
    from protocol.model import build_model
    from protocol.wire import RunInfo

    info = RunInfo.model_validate(share())
    device = local_device(settings.device)
    model = build_model(info.model, seed=info.seed).to(device)
    rounds = follow(InnerTrainer(model, info.recipe, device, settings.micro_batch))
    log.info("rank stopped after %d rounds", rounds)


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # a second signal stops at once
        log.info("stopping after the current step (signal again to stop at once)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@app.command()
def status(
    coordinator: Annotated[str, typer.Option(help="the coordinator's URL")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status JSON")] = False,
) -> None:
    """Print the network's state: round, version, miners, recent held-out losses, the leaderboard."""
    import httpx

    try:
        response = httpx.get(f"{coordinator.rstrip('/')}/v1/status", timeout=10.0)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as e:
        fail(f"cannot read status from {coordinator}: {e}", 1)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    r, run = data["round"], data["run"]
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
        typer.echo("leaderboard (score: average loss gain on own data x its trained-on-own-data indicator)")
        head = f"{'miner':<16} {'score':>9} {'gain':>9} {'own>other':>9} {'rounds':>6} {'refused':>7}  why"
        typer.echo(f"  {head}")
        for entry in data["leaderboard"]:
            why = ", ".join(f"{k} {n}" for k, n in sorted(entry["refusals"].items()))
            typer.echo(
                f"  {entry['miner'][:16]:<16} {entry['score']:>9.4f} {entry['gain_avg']:>9.4f} "
                f"{entry['assigned_avg']:>9.2f} {entry['rounds_contributed']:>6} "
                f"{entry['rounds_refused']:>7}  {why}"
            )


@app.command()
def simulate(
    miners: Annotated[int, typer.Option(min=1, max=64, help="number of honest miner processes")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="rounds to train")] = 10,
    out: Annotated[Path, typer.Option(help="report, logs and state go here")] = Path("runs/simulate"),
    model: Annotated[str, typer.Option(help="model size")] = "tiny",
    codec: Annotated[str, typer.Option(help="sparseloco, dense_fp32, dense_bf16 or int8")] = "sparseloco",
    inner_steps: Annotated[int | None, typer.Option(help="H, inner steps per round")] = None,
    max_tokens: Annotated[int, typer.Option(help="corpus tokens to use")] = 4_000_000,
    timeout_s: Annotated[float, typer.Option(help="give up after this long")] = 1800.0,
    adversary: Annotated[
        list[str] | None,
        typer.Option(
            help="add COUNT cheating miners of KIND, as KIND:COUNT (repeatable); see node/adversary.py"
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a coordinator and N miners as processes on 127.0.0.1; print a row per round; write a report."""
    from gradpool.simulate import SimulationFailed, parse_adversaries
    from gradpool.simulate import simulate as run_simulation

    try:
        report = run_simulation(
            adversaries=parse_adversaries(adversary or []),
            miners=miners,
            rounds=rounds,
            out=out,
            model=model,
            codec=codec,
            inner_steps=inner_steps,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            config=config,
            echo=typer.echo,
        )
    except SimulationFailed as e:
        fail(str(e), 1)
    except ConfigError as e:
        fail(str(e))
    typer.echo(
        f"held-out loss {report['initial_eval_loss']:.4f} -> {report['final_eval_loss']:.4f}; "
        f"report in {out / 'report.json'}, plot in {out / 'loss.png'}"
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
