"""Fixtures for tests that run the real server: a development config on a fresh SQLite file, the
app, and a client on an ephemeral 127.0.0.1 port. Bigger helpers live in api_helpers.py."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from api_helpers import Api
from pytest_aiohttp import AiohttpClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from server.app import create_app
from server.config import Config, load_config
from server.db.engine import make_engine
from server.db.migrate import upgrade_sync

# Same variable as db_fixtures.py (not imported: that module is registered as a plugin by
# test_store.py and must not be imported earlier).
POSTGRES_URL_ENV = "TELEMED_TEST_POSTGRES_URL"


def make_config(tmp_path: Path, **overrides: object) -> Config:
    """A development config that ignores the machine's TELEMED_* environment."""
    return load_config(env={}, overrides={"dev": True, "data_dir": str(tmp_path), **overrides})


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database migrated once per run; each test starts from a copy, so the app's
    own upgrade at start-up finds it at head (running every migration per test is slow)."""
    config = make_config(tmp_path_factory.mktemp("template"))
    upgrade_sync(config.effective_database_url)
    return config.data_dir / "telemed.db"


@pytest.fixture
def config(tmp_path: Path, migrated_sqlite: Path) -> Config:
    config = make_config(tmp_path)
    shutil.copyfile(migrated_sqlite, tmp_path / "telemed.db")
    return config


@pytest.fixture
def app(config: Config) -> web.Application:
    return create_app(config)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, app: web.Application
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(app)


@pytest.fixture
def api(client: TestClient[web.Request, web.Application]) -> Api:
    """The client, with tokens minted by the app for the identities in api_helpers."""
    return Api(client)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend_config(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Config]:
    """A config on SQLite, or on a fresh PostgreSQL database when TELEMED_TEST_POSTGRES_URL is
    set. create_app() takes only a URL (no connect_args for db_fixtures' per-test schema), so
    each PostgreSQL test gets its own database instead, dropped afterwards."""
    if request.param == "sqlite":
        yield make_config(tmp_path)
        return
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    name = f"t_api_{secrets.token_hex(6)}"
    engine = make_engine(url)
    admin = engine.execution_options(isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            test_url = make_url(url).set(database=name).render_as_string(hide_password=False)
            yield make_config(tmp_path, database_url=test_url)
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()


@pytest.fixture
async def backend_api(aiohttp_client: AiohttpClient, backend_config: Config) -> Api:
    """An Api on each backend of backend_config."""
    return Api(await aiohttp_client(create_app(backend_config)))
