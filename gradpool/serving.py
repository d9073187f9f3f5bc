"""``gradpool coordinator serve``: build the run and serve it. On the embedded store the process is the
network's one coordinator. On a shared store (PostgreSQL) it is a replica: until it holds the leader lease
it listens all the same and passes every request on to the leader (coordinator/api/standby.py); once it
takes the lease it serves the run itself on the same port, and says where in the store for the others."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

from gradpool.console import fail

log = logging.getLogger("gradpool")


async def serve_coordinator(settings: Any, ready_file: Path | None, hooks: Any = None) -> None:
    """Build the run, serve it until stopped, and say where once listening (the log, ``ready_file``).
    ``hooks``: a ``coordinator.hooks.Hooks`` (tests hold a close before its commit this way)."""
    from coordinator.api.app import create_app
    from coordinator.api.server import bound_port, make_server
    from coordinator.api.standby import advertise
    from coordinator.run import Run
    from coordinator.storage.sql import embedded
    from protocol.errors import ProtocolError

    tls = {}
    if settings.ssl_certfile is not None:
        tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)}
        try:  # a certificate that does not load is a clear error here, before anything starts
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*tls.values())
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            fail(f"cannot serve HTTPS with {settings.ssl_certfile} and {settings.ssl_keyfile}: {e}")
    shared = not embedded(settings.store_url())
    standby = await StandBy.start(settings, tls) if shared else None
    try:
        run = await asyncio.to_thread(Run, settings, hooks=hooks)
    except (ProtocolError, ValueError, OSError) as e:
        fail(str(e))
    finally:
        port = settings.port if standby is None else await standby.stop()
    server = make_server(create_app(settings, run=run), settings.host, port, **tls)

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        url = f"{settings.scheme()}://{settings.host}:{bound_port(server)}"
        log.info("coordinator listening on %s (state in %s)", url, settings.state_dir)
        if shared:  # where the standbys send what they ask (a store down for now: again, until it is back)
            reachable = settings.cluster.url or reachable_url(settings, bound_port(server))
            while not run.lease.lost.is_set():
                try:
                    await asyncio.to_thread(advertise, run.store, run.lease.holder, reachable)
                    break
                except Exception as e:
                    log.warning("cannot say where this leader listens: %s: %s", type(e).__name__, e)
                    await asyncio.sleep(1.0)
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            os.replace(tmp, ready_file)

    async def step_down() -> None:  # a leader that lost its lease, or its closer, stops serving, and says why
        while not run.lease.lost.is_set() and not run.closer.ended:
            await asyncio.sleep(0.5)
        server.should_exit = True

    tasks = [asyncio.create_task(announce()), asyncio.create_task(step_down())]
    await server.serve()
    for task in tasks:
        task.cancel()
    if run.lease.lost.is_set():
        fail(f"stopped: lost the leader lease ({run.lease.why})", 1)
    if run.closer.ended:
        fail("stopped: the thread that closes rounds ended (its error is in the log above)", 1)


def reachable_url(settings: Any, port: int) -> str:
    """This replica's URL for the others: its host, or its hostname where it listens on every address."""
    host = socket.gethostname() if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"{settings.scheme()}://{host}:{port}"


class StandBy:
    """The server of a replica waiting for the leader lease: every request goes on to the leader."""

    def __init__(self, server: Any, task: asyncio.Task[None], store: Any, port: int) -> None:
        self.server, self.task, self.store, self.port = server, task, store, port

    @classmethod
    async def start(cls, settings: Any, tls: dict[str, str]) -> StandBy:
        from coordinator.api.server import bound_port, make_server
        from coordinator.api.standby import LeaderDirectory, standby_app
        from coordinator.rounds.direct import ReplicaIntake
        from coordinator.storage.lease import holder_name
        from coordinator.storage.store import STARTING_PATIENCE_S, open_store
        from protocol.errors import ProtocolError

        try:  # PostgreSQL may be restarting: a replica that starts meanwhile waits for it a while
            url = settings.store_url()
            store = await asyncio.to_thread(open_store, settings.state_dir, url, STARTING_PATIENCE_S)
            # direct uploads' forms given here, their commits checked here: the leader only records them
            intake = None
            if settings.blobs.direct_uploads:
                intake = await asyncio.to_thread(ReplicaIntake.of, settings, store)
        except (ProtocolError, ValueError, OSError) as e:
            fail(str(e))
        verify: bool | ssl.SSLContext = True
        if settings.ssl_certfile is not None:  # the replicas' certificates come from the same authority
            verify = ssl.create_default_context()
            verify.load_verify_locations(settings.ssl_certfile)
        app = standby_app(
            LeaderDirectory(store),
            holder_name(settings.cluster.name),
            verify,
            intake=intake,
            body_timeout_s=settings.read_timeout_s,
        )
        # a request still waiting on a leader that died must not hold the port when this one takes over
        # the peer's own address is appended to X-Forwarded-For, which the leader alone reads and trusts
        server = make_server(
            app, settings.host, settings.port, timeout_graceful_shutdown=2, proxy_headers=False, **tls
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                fail(f"cannot listen on {settings.host}:{settings.port} to stand by")
            await asyncio.sleep(0.05)
        port = bound_port(server)
        log.info("standing by on port %d: every request goes on to the leader until this one leads", port)
        return cls(server, task, store, port)

    async def stop(self) -> int:
        """Stop forwarding (this replica leads now, or is stopping); the port it listened on."""
        self.server.should_exit = True
        await self.task
        await asyncio.to_thread(self.store.close)
        return self.port
