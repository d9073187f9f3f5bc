"""moto's S3 server as the cluster benchmark runs it, in a process of its own: ``python -m
benchmarks.s3_server --port N``.

Two differences from ``python -m moto.server``, both to behave as an S3 service does rather than as a
development server: connections are kept alive (HTTP/1.1: moto's own server answers in HTTP/1.0 and so
closes the connection after every request, which charges each request a TCP handshake on both sides and a
thread in the server), and requests are not logged one by one to the terminal. The buckets and their
answers are moto's.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


class KeepAliveHandler(MotoRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """No line per request (errors are still logged)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=KeepAliveHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
