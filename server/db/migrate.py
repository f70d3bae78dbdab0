"""Schema migrations, driven from code: there is no alembic.ini.

upgrade() and downgrade_to_base() open the async engine themselves and run alembic on its
connection via run_sync, so they work from inside a running event loop (the server, tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from server.db.engine import make_engine, sqlite_path

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    """A Config for alembic.command; with a URL, env.py opens its own engine (CLI use)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # The value goes through configparser interpolation: a % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


async def upgrade(
    database_url: str, revision: str = "head", *, connect_args: Mapping[str, Any] | None = None
) -> None:
    """Migrate to `revision` (default: the newest). A database already there is left as is."""
    await _run(database_url, connect_args, lambda config: command.upgrade(config, revision))


async def downgrade_to_base(
    database_url: str, *, connect_args: Mapping[str, Any] | None = None
) -> None:
    """Undo every migration: drops all tables of the record."""
    await _run(database_url, connect_args, lambda config: command.downgrade(config, "base"))


def upgrade_sync(database_url: str) -> None:
    """upgrade() for synchronous callers (the CLI); not from inside an event loop."""
    asyncio.run(upgrade(database_url))


async def current_revision(
    database_url: str, *, connect_args: Mapping[str, Any] | None = None
) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = make_engine(database_url, connect_args=connect_args)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    """The newest revision the code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _run(
    database_url: str,
    connect_args: Mapping[str, Any] | None,
    action: Callable[[Config], None],
) -> None:
    path = sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url, connect_args=connect_args)
    try:
        # One transaction: on PostgreSQL (and SQLite, see engine.py) DDL is transactional, so
        # a failed migration leaves the schema as it was.
        async with engine.begin() as conn:
            await conn.run_sync(_with_connection, action)
    finally:
        await engine.dispose()


def _with_connection(connection: Connection, action: Callable[[Config], None]) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection  # picked up by server/migrations/env.py
    action(config)
