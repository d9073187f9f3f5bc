"""The coordinator's HTTP server: uvicorn with h11, answering the requests its parser refuses (a request
line or headers over the size limit, malformed HTTP) with the documented error body instead of plain text.
The CLI and the tests build their servers here."""

from __future__ import annotations

import json
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

# An idle connection is closed by its client before the server closes it: a request sent on a connection
# the server is closing just then fails with nothing read. Clients let theirs go sooner (httpx: after 5 s,
# which is also uvicorn's own default, so that the two raced; a standby's: after 2 s).
KEEP_ALIVE_S = 30


class JsonErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"code": "bad_http_request", "message": msg}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def make_server(app: Starlette, host: str, port: int, **config: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` (port 0: the kernel picks a free port; see ``bound_port``)."""
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            http=JsonErrorH11Protocol,
            log_level="warning",
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_S,
            **config,
        )
    )


def bound_port(server: uvicorn.Server) -> int:
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port
