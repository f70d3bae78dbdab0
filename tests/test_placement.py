"""Rooms placed on workers through a real Redis (server/placement.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis_fixtures import RestartableRedis

from rooms.errors import Unavailable
from rooms.model import ConsultationId
from server.placement import RedisPlacement, WorkerLoad

pytest_plugins = ["redis_fixtures"]


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[list[RedisPlacement]]:
    started: list[RedisPlacement] = []
    for i in range(2):
        placement = RedisPlacement(redis_url, f"node/w{i}", WorkerLoad, heartbeat_s=0.1, ttl_s=0.5)
        await placement.start()
        started.append(placement)
    yield started
    for placement in started:
        await placement.stop()


async def test_a_room_has_one_owner_whoever_asks_and_however_many_at_once(
    workers: list[RedisPlacement],
) -> None:
    a, b = workers
    answers = await asyncio.gather(
        *(w.owner_of(ConsultationId("c-1")) for w in (a, b) for _ in range(10))
    )
    assert len({p.owner for p in answers}) == 1
    assert answers[0].owner in {a.worker_id, b.worker_id}
    assert sum(p.fresh for p in answers) == 1


async def test_rooms_spread_over_the_workers(workers: list[RedisPlacement]) -> None:
    a, b = workers
    owners = Counter(
        [(await (a if i % 3 else b).owner_of(ConsultationId(f"c-{i}"))).owner for i in range(20)]
    )
    # Two choices of two workers: each placement goes to the one with fewer rooms.
    assert owners[a.worker_id] == owners[b.worker_id] == 10


async def test_a_released_room_is_placed_again_fresh(workers: list[RedisPlacement]) -> None:
    a, _ = workers
    first = await a.owner_of(ConsultationId("c-1"))
    owner = next(w for w in workers if w.worker_id == first.owner)
    await owner.release(ConsultationId("c-1"))
    again = await a.owner_of(ConsultationId("c-1"))
    assert again.fresh and again.previous == ""


async def test_a_room_whose_worker_died_goes_to_a_live_one(
    workers: list[RedisPlacement], redis_url: str
) -> None:
    a, b = workers
    # Place rooms until one lands on b, then b dies without a word (its heartbeat stops).
    placed = [
        (await a.owner_of(ConsultationId(f"c-{i}")), ConsultationId(f"c-{i}")) for i in range(4)
    ]
    cid = next(c for p, c in placed if p.owner == b.worker_id)
    assert b._beat is not None
    b._beat.cancel()
    await until_dead(a, b.worker_id)
    moved = await a.owner_of(cid)
    assert moved == type(moved)(a.worker_id, True, b.worker_id)
    assert (await a.owner_of(cid)).fresh is False
    # A worker restarted on the same node is a new incarnation: the dead one's rooms stay lost.
    reborn = RedisPlacement(redis_url, "node/w1", WorkerLoad, heartbeat_s=0.1, ttl_s=0.5)
    assert reborn.worker_id != b.worker_id
    await reborn.stop()


async def until_dead(observer: RedisPlacement, worker: str) -> None:
    for _ in range(200):  # the TTL is 0.5 s; 10 s of polls is ample on a loaded machine
        if worker not in await observer.alive({worker}):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker} still alive")


async def test_the_heartbeat_reports_the_load(redis_url: str) -> None:
    placement = RedisPlacement(
        redis_url, "node/w0", lambda: WorkerLoad(rooms=3, tracks=7, frames_per_s=120.0)
    )
    await placement.start()
    try:
        load = await placement.load_of(placement.worker_id)
        assert load is not None
        assert (load.rooms, load.tracks, load.frames_per_s) == (3, 7, 120.0)
        assert load.cpu >= 0
    finally:
        await placement.stop()
    assert await placement_alive(redis_url, placement.worker_id) is False


async def placement_alive(redis_url: str, worker: str) -> bool:
    probe = RedisPlacement(redis_url, "probe", WorkerLoad)
    try:
        return worker in await probe.alive({worker})
    finally:
        await probe.stop()


async def test_redis_away_is_unavailable(restartable_redis: RestartableRedis) -> None:
    placement = RedisPlacement(restartable_redis.url, "node/w0", WorkerLoad, heartbeat_s=0.1)
    await placement.start()
    try:
        restartable_redis.kill()
        with pytest.raises(Unavailable, match="room placement is unavailable"):
            await placement.owner_of(ConsultationId("c-1"))
        restartable_redis.start_again()
        # A Redis that lost everything: the worker registers again and places the room.
        placed = await placement.owner_of(ConsultationId("c-1"))
        assert placed.owner == placement.worker_id and placed.fresh
    finally:
        await placement.stop()


async def test_one_worker_at_a_time_cleans_up_after_a_dead_one(
    workers: list[RedisPlacement],
) -> None:
    a, b = workers
    placed = {c: await a.owner_of(c) for c in map(ConsultationId, ("c-1", "c-2", "c-3", "c-4"))}
    on_b = {c for c, p in placed.items() if p.owner == b.worker_id}
    await b.stop()  # a clean stop is a death too: its rooms are left for another to end
    await until_dead(a, b.worker_id)
    assert await a.dead_workers() == [b.worker_id]
    assert await a.rooms_of(b.worker_id) == on_b
    assert await a.lease(b.worker_id, ttl_s=30) is True
    assert await a.lease(b.worker_id, ttl_s=30) is False
    await a.forget(b.worker_id)
    assert await a.dead_workers() == []
    assert await a.rooms_of(b.worker_id) == set()
