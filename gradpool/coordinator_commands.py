"""The coordinator's maintenance commands, run with it stopped: ``gradpool coordinator migrate``,
``rollback`` and ``certs`` (``coordinator serve`` is in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradpool.config import ConfigError, load_settings
from gradpool.console import ConfigOpt, fail

StoreUrlOpt = Annotated[
    str | None,
    typer.Option(help="the store: postgresql://... or sqlite:///PATH (default: the state dir's state.db)"),
]


def migrate(
    state_dir: Annotated[Path | None, typer.Option(help="the coordinator's state directory")] = None,
    store_url: StoreUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Upgrade a store's schema to the one this gradpool runs on (back the store up first)."""
    from coordinator.settings import CoordinatorSettings
    from coordinator.storage.lock import StateLock
    from coordinator.storage.schema import migrate as upgrade
    from coordinator.storage.sql import SQLITE_FILE, make_engine, redacted
    from coordinator.storage.sql import store_url as url_of

    if config is not None:
        try:
            settings = load_settings(CoordinatorSettings, config, {"state_dir": state_dir})
        except ConfigError as e:
            fail(str(e))
        state_dir = settings.state_dir
        store_url = store_url or settings.store_url()
    if store_url is None:
        if state_dir is None:
            fail("say which store to migrate: --state-dir DIR, --store-url URL or --config FILE")
        if not (state_dir / SQLITE_FILE).is_file():
            fail(f"{state_dir} holds no coordinator state (no {SQLITE_FILE})")
    url = url_of(state_dir or Path("."), store_url)
    try:
        lock = StateLock(state_dir) if state_dir is not None and state_dir.is_dir() else None
    except (ValueError, OSError) as e:
        fail(str(e), 1)
    try:
        engine = make_engine(url)
        try:
            was, now = upgrade(engine)
        finally:
            engine.dispose()
    except (ValueError, OSError) as e:
        fail(str(e), 1)
    except Exception as e:  # the database's own errors (SQLAlchemy's): unreachable, refused, ...
        fail(f"cannot migrate {redacted(url)}: {type(e).__name__}: {str(e).splitlines()[0]}", 1)
    finally:
        if lock is not None:
            lock.release()
    if was == now:
        typer.echo(f"{redacted(url)}: schema {now}, nothing to do")
    else:
        typer.echo(f"{redacted(url)}: schema {was or 'from before migrations'} -> {now}")


def rollback(
    state_dir: Annotated[Path, typer.Option(help="the coordinator's state directory")],
    to_version: Annotated[int, typer.Option(min=0, help="the version to make current again")],
    key: Annotated[
        Path | None,
        typer.Option(help="the coordinator's key ([identity] key); default: the state dir's coordinator.pem"),
    ] = None,
    store_url: StoreUrlOpt = None,
) -> None:
    """Make an earlier version current again (with the coordinator stopped); the audit trail is kept."""
    from coordinator.rounds.rollback import rollback as roll_back

    try:
        done = roll_back(state_dir, to_version, key, store_url)
    except (ValueError, OSError) as e:
        fail(str(e), 1)
    aside = ", ".join(map(str, done.set_aside)) or "none"
    r, v = done.closed_round, done.version
    typer.echo(
        f"version {v} is current again; versions set aside: {aside}; round {r} closed, round {r + 1} "
        f"opens for version {v}"
    )


def certs(
    out: Annotated[Path, typer.Option(help="where to write ca.pem, cert.pem and key.pem")],
    name: Annotated[
        list[str], typer.Option("--name", help="a host name or IP address nodes reach it by (repeatable)")
    ],
    days: Annotated[int, typer.Option(min=1, max=3650, help="how long the certificates are valid")] = 825,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="keep certificates already there")] = False,
) -> None:
    """Make a certificate authority of your own and a server certificate it signs for the coordinator's
    names: serve with --ssl-certfile cert.pem --ssl-keyfile key.pem, give nodes --ca-cert ca.pem."""
    from gradpool.tls import make_tls

    if any((out / f).exists() for f in ("ca.pem", "cert.pem", "key.pem")):
        if exist_ok and all((out / f).exists() for f in ("ca.pem", "cert.pem", "key.pem")):
            typer.echo(f"{out} already holds certificates; kept")
            return
        fail(f"{out} already holds certificates; choose another --out (or --exist-ok to keep them)")
    try:
        tls = make_tls(out, name, days=days)
    except OSError as e:
        fail(f"cannot write to {out}: {e.strerror}", 1)
    typer.echo(f"{tls.ca}  (give nodes --ca-cert)\n{tls.cert}  {tls.key}  (for {', '.join(name)})")
