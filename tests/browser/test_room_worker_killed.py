"""The worker that owns a live room is killed with -9 under `telemed serve --workers 2`: every
page reconnects by itself into its own seat, on a live worker, and video flows again between
everyone (their media connections start afresh on the room's new worker)."""

from __future__ import annotations

import os
import re
import signal

import pytest
import redis.asyncio as aioredis
from conftest import (
    Browsers,
    Server,
    assert_video_flows,
    eventually,
    no_missing_strings,
    sign_in_as,
    start_server,
    stop_server,
)
from redis_fixtures import RedisServer

pytestmark = pytest.mark.browser
pytest_plugins = ["redis_fixtures"]

STARTED = re.compile(r"^telemed worker (\d+) started \(pid (\d+), node (\S+)\)$", re.MULTILINE)


async def seated(party: object) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))  # type: ignore[attr-defined]


async def owner_pid(server: Server, redis_url: str, cid: str) -> int:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        incarnation = await client.get(f"telemed:placement:{cid}")
    finally:
        await client.aclose()
    assert incarnation, "the room is placed nowhere"
    node = str(incarnation).split("#", 1)[0]
    started = STARTED.findall((server.log.parent / "server.stdout").read_text())
    return [int(pid) for _, pid, n in started if n == node][-1]


async def test_the_pages_survive_the_room_worker_killed(
    tmp_path: object, browsers: Browsers, redis_server: RedisServer
) -> None:
    with redis_server.client() as plain:
        plain.flushall()
    server = await start_server(
        tmp_path,  # type: ignore[arg-type]
        redis_url=redis_server.url,
        workers=2,
        reconnect_grace_s=60,
    )
    try:
        demo = await server.demo()
        cid = demo["consultation"]["id"]
        tokens = {i["role"]: i["token"] for i in demo["identities"]}
        village = await browsers.party("village", (200, 30, 30), 330)
        county = await browsers.party("county", (30, 160, 40), 440)
        specialist = await browsers.party("specialist", (30, 60, 200), 550)
        await sign_in_as(village, server, "village_doctor")
        await village.page.goto(f"{server.url}/web/room.html?c={cid}")
        await village.page.locator("#join").click()
        await eventually(lambda: seated(village), "the village doctor to open the session")
        for party, role in ((county, "county_physician"), (specialist, "provincial_specialist")):
            await party.page.goto(f"{server.url}/web/room.html?c={cid}#token={tokens[role]}")
            await party.page.locator("#join").click()
            await eventually(lambda party=party: seated(party), f"{party.name} to be seated")
        everyone = [village, county, specialist]
        for p in everyone:
            await p.page.locator("#layer").select_option("full")
        ids = {await p.participant_id(): p.name for p in everyone}
        await assert_video_flows(everyone, ids)

        os.kill(await owner_pid(server, redis_server.url, cid), signal.SIGKILL)

        async def all_back() -> bool:
            for p in everyone:
                if await p.debug("reconnecting()") or not await seated(p):
                    return False
            return True

        await eventually(all_back, "every page back in the room")
        # The same seats, and video between everyone again, through the room's new worker.
        assert {await p.participant_id(): p.name for p in everyone} == ids
        await assert_video_flows(everyone, ids)
        no_missing_strings(*everyone)
    finally:
        await stop_server(server)
