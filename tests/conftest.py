"""Shared fixtures: a small corpus, coordinator settings, and a real uvicorn coordinator on 127.0.0.1:0."""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from benchmarks.postgres import Postgres, pg_bin
from coordinator.api.app import create_app
from coordinator.settings import CoordinatorSettings
from gradpool.processes import Child
from protocol.data import stdlib_dir
from tests.helpers import memo
from tests.helpers.required import required
from tests.helpers.served import serving
from tests.helpers.waiting import wait_until

# One torch thread in every test process (and in every process a test starts): several test workers share
# the machine's cores, and more threads would oversubscribe them, which slows torch's kernels far more than
# it saves; and a reduction's result depends on how many threads share it, so a test's numbers are the same
# however the suite is run (`-n 0` included).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _memo_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where tests/helpers/memo.py keeps results for the session: one folder for all its workers."""
    root = tmp_path_factory.getbasetemp()
    os.environ[memo.ENV] = str((root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "memo")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 400 KB of Python source as one .txt file: enough sequences, quick to tokenise."""
    root = stdlib_dir()
    names = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "textwrap.py", "typing.py"]
    text = "\n\n".join((root / n).read_text(encoding="utf-8") for n in names)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, corpus_file: Path) -> Callable[..., CoordinatorSettings]:
    """Coordinator settings at the production defaults (coordinator/settings.py) but for what makes a test
    slow; keyword overrides are merged in. Overlapped rounds, as in production: a test about synchronous
    rounds passes ``rounds={"overlap": False}``."""

    def make(**overrides: Any) -> CoordinatorSettings:
        base: dict[str, Any] = {
            "state_dir": tmp_path / "coordinator",
            "host": "127.0.0.1",
            "port": 0,
            # For speed: a 400 KB corpus instead of the standard library, and 16 held-out sequences to
            # evaluate each version on instead of 64.
            "data": {"corpus": corpus_file, "eval_sequences": 16},
            # For speed: 4 inner steps of 4 sequences instead of 20 of 8, with the warmup cut to match (2,
            # not 20) and a higher lr (3e-3, not 2e-3), so that a few short rounds still learn visibly.
            "recipe": {"inner_steps": 4, "batch_size": 4, "warmup_steps": 2, "lr": 3e-3},
            # For speed: an evaluation of 16 + 32 sequences instead of 48 + 48, not doubled in the first
            # rounds (early_factor 1, not 2; tests about the first rounds' samples set it).
            "validation": {"own_sequences": 16, "other_sequences": 32, "early_factor": 1},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return CoordinatorSettings(**base)

    return make


class LiveServer:
    """A real uvicorn coordinator in a thread, on 127.0.0.1 with a free port."""

    def __init__(self, settings: CoordinatorSettings, **app: Any) -> None:
        self.app = create_app(settings, **app)
        self._served = serving(self.app, proxy_headers=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.url = self._served.__enter__()
        return self

    def wait_rounds(self, n: int, procs: Sequence[Child] = (), timeout_s: float = 60) -> dict[str, Any]:
        """``/v1/status`` once ``n`` rounds have closed (a miner exits after its last upload, before that
        round has closed); ``procs``: miners that must not exit meanwhile."""

        def closed() -> dict[str, Any] | None:
            status: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=10).json()
            assert all(p.poll() is None for p in procs), "a miner exited early"
            return status if len(status["rounds"]) >= n else None

        return wait_until(closed, timeout_s, f"{n} rounds to close", interval_s=0.3)

    def __exit__(self, *exc: Any) -> None:
        self._served.__exit__(*exc)


@pytest.fixture
def live_coordinator(make_settings: Callable[..., CoordinatorSettings]) -> Callable[..., LiveServer]:
    """Factory: ``with live_coordinator(**overrides) as server: server.url``."""

    def start(**overrides: Any) -> LiveServer:
        return LiveServer(make_settings(**overrides))

    return start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tests, and run the files with slow tests first (integration before unit), so
    that the longest files start at once on the workers and the short ones fill in after them, instead of a
    long network test starting last while the other workers idle (pyproject keeps xdist from reordering)."""
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda t: (t.path not in slow_files, "integration" not in str(t.path), order[id(t)]))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto), listening on 127.0.0.1 only."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.stop()


@functools.cache
def _admin(endpoint: str) -> Any:
    """One S3 client for the tests' own bucket handling (making a client takes a good part of a second)."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)


@pytest.fixture(scope="session")
def postgres_bin() -> Path:
    """PostgreSQL's programs (required in CI; elsewhere the tests that need them skip without them)."""
    return required(pg_bin(), "PostgreSQL", "apt-get install postgresql")


@pytest.fixture(scope="session")
def postgres_server(postgres_bin: Path) -> Iterator[Postgres]:
    """A real PostgreSQL server for this test worker."""
    server = Postgres(postgres_bin)
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the test worker's server."""
    return postgres_server.database()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store of each backend: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """A fresh bucket and the blobs settings that point at it; dummy credentials in the environment."""

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bucket = f"gradpool-{uuid.uuid4().hex[:16]}"
    _admin(s3_endpoint).create_bucket(Bucket=bucket)
    return {"backend": "s3", "s3_bucket": bucket, "s3_endpoint_url": s3_endpoint, "s3_prefix": "runs/test/"}
