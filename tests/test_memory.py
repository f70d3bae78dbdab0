"""server/memory.py: a started server's objects are out of the collector's way."""

from __future__ import annotations

import gc

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.memory import freeze_after_startup


async def test_what_startup_made_is_frozen_once_the_app_has_started() -> None:
    app = web.Application()
    made_at_startup: list[object] = []

    async def startup(_: web.Application) -> None:
        made_at_startup.append({"kept": ["for", "the", "process"]})

    app.on_startup.append(startup)
    freeze_after_startup(app)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    client = TestClient(TestServer(app))
    try:
        await client.start_server()
        # After the app's own start-up hooks, not before: theirs are frozen too.
        assert gc.get_freeze_count() > 0
        assert not any(o is made_at_startup[0] for o in gc.get_objects())
    finally:
        await client.close()
        gc.unfreeze()
