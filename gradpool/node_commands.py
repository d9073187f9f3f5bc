"""``gradpool mine`` and ``gradpool validate``: the node daemons' commands."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gradpool.config import ConfigError, load_settings, setup_logging
from gradpool.console import ConfigOpt, fail

log = logging.getLogger("gradpool")


CaCertOpt = Annotated[Path | None, typer.Option(help="HTTPS: trust this CA's certificates too (PEM)")]
CoordinatorKeyOpt = Annotated[
    str | None,
    typer.Option(help="the coordinator's public key (hex) to pin; default: pinned on first use"),
]


def mine(
    coordinator: Annotated[str | None, typer.Option(help="the coordinator's URL")] = None,
    ca_cert: CaCertOpt = None,
    coordinator_key: CoordinatorKeyOpt = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key (PEM)")] = None,
    create_key: Annotated[bool | None, typer.Option("--create-key", help="create the key if missing")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="error feedback and optimizer state")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="sequences per forward pass")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="stop after this many uploads")] = None,
    once: Annotated[bool, typer.Option("--once", help="mine one round, then exit")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[str | None, typer.Option(help="address of the metrics endpoint")] = None,
    adversary: Annotated[
        str | None,
        typer.Option(
            help="simulations only: cheat as noise, scaled, signflip, copycat, stale, lazy, freerider, nan, "
            "lutscale or sybil"
        ),
    ] = None,
    adversary_shared: Annotated[
        Path | None, typer.Option(help="simulations only, sybil: a folder the operator's keys share")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Mine: train on the coordinator's rounds and upload compressed updates."""
    from node.adversary import Adversary
    from node.errors import ClientError, ProtocolMismatch, Refused
    from node.miner import Miner
    from node.settings import MinerSettings

    overrides = {
        "coordinator": coordinator,
        "ca_cert": ca_cert,
        "coordinator_key": coordinator_key,
        "key": key,
        "create_key": create_key,
        "state_dir": state_dir,
        "device": device,
        "micro_batch": micro_batch,
        "threads": threads,
        "max_rounds": 1 if once else max_rounds,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "adversary": adversary,
        "adversary_shared": adversary_shared,
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


def validate(
    coordinator: Annotated[str | None, typer.Option(help="the coordinator's URL")] = None,
    ca_cert: CaCertOpt = None,
    coordinator_key: CoordinatorKeyOpt = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key (PEM)")] = None,
    create_key: Annotated[bool | None, typer.Option("--create-key", help="create the key if missing")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="downloads and progress")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="stop after evaluating this many rounds")] = None,
    config: ConfigOpt = None,
) -> None:
    """Validate: evaluate each closed round's uploads and post signed verdicts to the coordinator."""
    from node.errors import ClientError, ProtocolMismatch
    from node.settings import ValidatorSettings
    from node.validator import Validator

    overrides = {
        "coordinator": coordinator,
        "ca_cert": ca_cert,
        "coordinator_key": coordinator_key,
        "key": key,
        "create_key": create_key,
        "state_dir": state_dir,
        "device": device,
        "threads": threads,
        "max_rounds": max_rounds,
    }
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
    from node.client import CoordinatorClient
    from node.errors import ProtocolMismatch, Unavailable, Untrusted
    from node.trust import Trust
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
    try:
        client = CoordinatorClient(
            settings.coordinator,
            private,
            timeout_s=settings.timeout_s,
            ca_cert=settings.ca_cert,
            trust=Trust(settings.state_dir, settings.coordinator_key),
        )
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        fail(f"cannot read the CA certificate {settings.ca_cert}: {e}")
    deadline = time.monotonic() + settings.startup_timeout_s
    while True:
        try:
            return client, client.info()
        except ProtocolMismatch as e:
            fail(str(e))
        except Untrusted as e:
            fail(str(e), 1)
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
    model = build_model(info.architecture, seed=info.seed).to(device)
    rounds = follow(InnerTrainer(model, info.recipe, device, settings.micro_batch))
    log.info("rank stopped after %d rounds", rounds)
    # done, and the process group is down: end here, since the interpreter's teardown of the collective
    # library's threads can still abort the process (SIGABRT), which torchrun reports as the rank failing
    logging.shutdown()
    os._exit(0)


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # a second signal stops at once
        log.info("stopping after the current step (signal again to stop at once)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
