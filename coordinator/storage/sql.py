"""The database under the store, SQLite or PostgreSQL, through SQLAlchemy Core: the engine for a store URL,
and the statements, written once with ``?`` placeholders, handed to either backend's driver in its style.

PostgreSQL's connections come from the engine's pool, checked before use, so that a database restarted
under a running coordinator costs it only the statements made while it was down; SQLite's file has one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, RowMapping, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

SQLITE_FILE = "state.db"  # the embedded default, in the state directory


def store_url(state_dir: Path, url: str | None) -> str:
    """The store's URL: ``url`` as set (``[store] url``), else the SQLite file in ``state_dir``."""
    return url if url else f"sqlite:///{state_dir / SQLITE_FILE}"


def embedded(url: str | None) -> bool:
    """Whether ``[store] url`` (None: the default) is the embedded SQLite file, one process's alone (a URL
    that does not parse is not: opening it says what is wrong with it)."""
    try:
        return url is None or make_url(url).get_backend_name() == "sqlite"
    except ArgumentError:
        return False


def make_engine(url: str) -> Engine:
    """The engine for a store URL: ``sqlite:///PATH``, or ``postgresql://...`` (psycopg 3)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"[store] url {url!r} is not a database URL") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # one connection: the store's lock serialises its use anyway, so a pool would only add checkouts
        engine = create_engine(parsed, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True)
    raise ValueError(f"[store] url {redacted(url)!r}: gradpool stores in sqlite:/// or postgresql://")


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@functools.lru_cache(maxsize=1024)
def statement(sql: str, paramstyle: str) -> str:
    """``sql``, written with ``?`` placeholders, in the driver's own style (``qmark``: SQLite's, as written;
    ``format``/``pyformat``: psycopg's ``%s``)."""
    if paramstyle == "qmark":
        return sql
    return sql.replace("%", "%%").replace("?", "%s")


class Tx:
    """Statements on the store's connection (inside a transaction, or each on its own), their parameters
    a sequence as in the DB-API. They go to the driver as written (``exec_driver_sql``): the store's SQL is
    plain text, so SQLAlchemy's compiler has nothing to add but time on the intake's hot path."""

    def __init__(self, connection: Connection) -> None:
        self._c = connection
        self._style = connection.dialect.paramstyle

    def _run(self, sql: str, args: Sequence[Any]) -> CursorResult[Any]:
        return self._c.exec_driver_sql(statement(sql, self._style), tuple(args))

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[RowMapping]:
        return list(self._run(sql, args).mappings().all())

    def one(self, sql: str, args: Sequence[Any] = ()) -> RowMapping | None:
        return self._run(sql, args).mappings().first()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self._run(sql, args)

    def count(self, sql: str, args: Sequence[Any] = ()) -> int:
        """The rows a write statement changed."""
        return int(self._run(sql, args).rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        many = [tuple(r) for r in rows]
        if many:
            self._c.exec_driver_sql(statement(sql, self._style), many)
