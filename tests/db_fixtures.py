"""Database fixtures: a fresh, migrated database per test on every configured backend.

Backends: "sqlite" (a file under tmp_path) always; "postgres" when TELEMED_TEST_POSTGRES_URL is
set (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test). Each PostgreSQL test gets its
own schema t_<random>, dropped with everything in it afterwards, so nothing is left behind.

Use with `pytest_plugins = ["db_fixtures"]` (test_store.py does) or import the fixtures into
conftest.py. PYTEST_DONT_REWRITE: there are no asserts here, and this marker lets the module be
imported before pytest registers it as a plugin without a (fatal) rewrite warning."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from server.db.engine import make_engine
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore

POSTGRES_URL_ENV = "TELEMED_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class TestDatabase:
    """Where a test's database is: pass url and connect_args to SqlRecordStore/upgrade."""

    __test__ = False  # not a test class, despite the name

    backend: str
    url: str
    connect_args: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(params=BACKENDS)
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TestDatabase]:
    """A database without any tables yet."""
    backend: str = request.param
    if backend == "sqlite":
        yield TestDatabase(backend, f"sqlite+aiosqlite:///{tmp_path / 'telemed.db'}")
        return
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    schema = f"t_{secrets.token_hex(6)}"
    admin = make_engine(url)
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            # Only this schema on the search path: tables, alembic_version and reflection
            # all land in it.
            yield TestDatabase(backend, url, {"server_settings": {"search_path": schema}})
        finally:
            async with admin.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        await admin.dispose()


@pytest.fixture
async def migrated_db(empty_db: TestDatabase) -> TestDatabase:
    """The database migrated to head."""
    await upgrade(empty_db.url, connect_args=empty_db.connect_args)
    return empty_db


@pytest.fixture
async def sql_store(migrated_db: TestDatabase) -> AsyncIterator[SqlRecordStore]:
    """A started SqlRecordStore on a migrated, empty database."""
    store = SqlRecordStore(migrated_db.url, connect_args=migrated_db.connect_args)
    await store.start()
    try:
        yield store
    finally:
        await store.stop()
