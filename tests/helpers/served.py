"""A Starlette app served by a real uvicorn on 127.0.0.1, in a thread, as gradpool/serving.py serves it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.applications import Starlette

from coordinator.api.server import bound_port, make_server
from tests.helpers.waiting import wait_until


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """The app's URL while it is served."""
    server = make_server(app, "127.0.0.1", 0, proxy_headers=False)  # as gradpool/serving.py serves it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the server to listen", interval_s=0.02)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
