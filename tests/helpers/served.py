"""A Starlette app served by a real uvicorn on 127.0.0.1, in a thread, as gradpool/serving.py serves it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.applications import Starlette

from coordinator.api.server import bound_port, make_server
from tests.helpers.waiting import wait_until


@contextmanager
def serving(app: Starlette, proxy_headers: bool = False) -> Iterator[str]:
    """The app's URL while it is served. ``proxy_headers``: trust X-Forwarded-For from 127.0.0.1, as a
    leader does (a standby does not: gradpool/serving.py)."""
    server = make_server(app, "127.0.0.1", 0, proxy_headers=proxy_headers)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "the server's thread ended at start"
        return bool(server.started)

    wait_until(started, 60, "the server to listen", interval_s=0.02)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
