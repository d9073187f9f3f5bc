"""A man in the middle on 127.0.0.1: a forwarding HTTP proxy in front of a coordinator that can rewrite the
answers of one kind (``rewrite``: a path pattern -> a function of the body), as an attacker on the path, a
hijacked name or a rogue replica would."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rewrite: dict[str, Callable[[bytes], bytes]] = {}  # path (a regular expression) -> new body
        self.rewritten = 0
        self.http = httpx.Client(timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                answer = proxy.http.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body
                )
                content = answer.content
                path = self.path.split("?")[0]
                for pattern, change in list(proxy.rewrite.items()):
                    if re.fullmatch(pattern, path) and answer.status_code == 200:
                        content = change(content)
                        proxy.rewritten += 1
                self.send_response(answer.status_code)
                for k, v in answer.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.http.close()


def flip_byte(data: bytes) -> bytes:
    """One bit of the middle byte changed."""
    if not data:
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 1
    return bytes(b)
