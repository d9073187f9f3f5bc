"""What a network beyond one machine runs on, here on 127.0.0.1: a real PostgreSQL server (its store), a
real S3-compatible server (moto) with a bucket (its blobs), and the network's coordinator key, which every
coordinator process signs with. ``benchmarks.chaos --replicas 2 --store postgres`` starts its coordinator
processes on these."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.postgres import Postgres, pg_bin
from protocol.signing import generate_key, save_key
from protocol.wire import HEADER_LEADER, HEADER_REPLICA

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def shared_settings(work: Path, database: str, endpoint: str, bucket: str) -> dict[str, Any]:
    """The settings every replica shares: the store, the bucket with direct uploads, one network key."""
    key = work / "coordinator.pem"
    save_key(generate_key(), key)
    return {
        "store": {"url": database},
        "blobs": {
            "backend": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": endpoint,
            "s3_prefix": "run",
            "direct_uploads": True,
        },
        "identity": {"key": str(key)},
    }


class Cluster:
    def __init__(self, work: Path, lease_s: float = 10.0) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.postgres = Postgres(bin_dir)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self.s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.s3.start()
        host, port = self.s3.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"gradpool-{uuid.uuid4().hex[:12]}"
        os.environ.update(S3_ENV)  # the coordinators' AWS chain, and this process's client's
        boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        self.settings = shared_settings(work, self.postgres.database(), endpoint, bucket)
        self.settings["cluster"] = {"lease_s": lease_s}

    def close(self) -> None:
        try:
            self.postgres.close()
        finally:
            self.s3.stop()


class Replicas:
    """GETs to whichever coordinator process answers: the leader, or a standby passing them on to it."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [httpx.Client(base_url=u, timeout=10.0) for u in urls]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        failed: Exception = httpx.ConnectError("no coordinator process answers")
        for client in self.clients:
            try:
                response = client.get(path, **kwargs)
            except httpx.TransportError as e:
                failed = e
                continue
            if response.status_code < 500:
                return response
        raise failed

    def leader(self) -> int | None:
        """The index of the process that leads and answers itself, if one does."""
        for i, client in enumerate(self.clients):
            with contextlib.suppress(httpx.HTTPError):
                r = client.get("/v1/round")
                if r.status_code == 200 and r.headers.get(HEADER_REPLICA) == r.headers.get(HEADER_LEADER):
                    return i
        return None

    def close(self) -> None:
        for client in self.clients:
            client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Any, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False
