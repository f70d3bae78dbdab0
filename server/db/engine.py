"""One way to open the database, shared by the store and the migrations."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# WAL with synchronous=NORMAL: a commit survives the server process dying (kill -9) and is
# only at risk from a power cut of the machine itself; FULL would fsync every chat message and
# cap a node at a few hundred writes a second. Deployments that need more run PostgreSQL.
SQLITE_PRAGMAS = ("foreign_keys=ON", "journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000")
# Execution option marking a read-only transaction (SQLite then begins it DEFERRED: with WAL
# it reads a snapshot and never waits for the writer).
READ_ONLY = "telemed_read_only"


def make_engine(database_url: str, *, connect_args: Mapping[str, Any] | None = None) -> AsyncEngine:
    """An AsyncEngine for `database_url` (sqlite+aiosqlite or postgresql+asyncpg).

    `connect_args` goes to the driver, e.g. {"server_settings": {"search_path": "s"}} for
    asyncpg."""
    is_sqlite = make_url(database_url).get_backend_name() == "sqlite"
    engine = create_async_engine(
        database_url,
        connect_args=dict(connect_args or {}),
        # A long-running server outlives PostgreSQL restarts; SQLite has no connection to lose.
        pool_pre_ping=not is_sqlite,
    )
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's legacy transaction control emits no BEGIN before SELECT or SAVEPOINT, so a
    # savepoint could commit on its own; take BEGIN over (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock up front: read-modify-write transactions queue behind
    # each other (busy_timeout) instead of failing with SQLITE_BUSY when they start writing.
    # This is SQLite's stand-in for SELECT ... FOR UPDATE. Reads need no lock.
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN DEFERRED")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_path(database_url: str) -> Path | None:
    """The file of an SQLite URL; None for other backends and in-memory databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)
