"""Requests between workers over a real Redis (server/worker_link.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis_fixtures import RestartableRedis

from rooms.errors import Unavailable
from server.worker_link import RedisWorkerLink
from signaling.routing import Message, WorkerGone

pytest_plugins = ["redis_fixtures"]


class Echo:
    """A handler that answers with what it was sent, in the order it was sent."""

    def __init__(self) -> None:
        self.heard: list[Message] = []

    async def __call__(self, message: Message) -> Message | None:
        self.heard.append(message)
        if message.get("slow"):
            await asyncio.sleep(message["slow"])
        return None if message.get("quiet") else {"echo": message}


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RedisWorkerLink, RedisWorkerLink, Echo]]:
    asker = RedisWorkerLink(redis_url, "w-asker", timeout_s=2.0)
    answerer = RedisWorkerLink(redis_url, "w-answerer", timeout_s=2.0)
    echo = Echo()
    await asker.start(Echo())
    await answerer.start(echo)
    yield asker, answerer, echo
    await asker.stop()
    await answerer.stop()


async def test_a_call_gets_its_own_answer_among_many(
    pair: tuple[RedisWorkerLink, RedisWorkerLink, Echo],
) -> None:
    asker, _, echo = pair
    answers = await asyncio.gather(*(asker.call("w-answerer", {"n": n}) for n in range(50)))
    assert answers == [{"echo": {"n": n}} for n in range(50)]
    assert sorted(m["n"] for m in echo.heard) == list(range(50))
    # What is sent one after the other (as a connection's events are) arrives in that order.
    echo.heard.clear()
    for n in range(20):
        await asker.tell("w-answerer", {"quiet": True, "n": n})
    for _ in range(200):  # 10 s of polls at most
        if len(echo.heard) == 20:
            break
        await asyncio.sleep(0.05)
    assert [m["n"] for m in echo.heard] == list(range(20))


async def test_a_tell_is_delivered_without_an_answer(
    pair: tuple[RedisWorkerLink, RedisWorkerLink, Echo],
) -> None:
    asker, _, echo = pair
    await asker.tell("w-answerer", {"quiet": True, "n": 1})
    for _ in range(200):  # 10 s of polls at most
        if echo.heard:
            break
        await asyncio.sleep(0.05)
    assert echo.heard == [{"quiet": True, "n": 1}]


async def test_nobody_listening_is_worker_gone_at_once(
    pair: tuple[RedisWorkerLink, RedisWorkerLink, Echo],
) -> None:
    asker, _, _ = pair
    with pytest.raises(WorkerGone, match="gone"):
        await asker.call("w-nobody", {"n": 1})


async def test_no_answer_in_time_is_unavailable(
    pair: tuple[RedisWorkerLink, RedisWorkerLink, Echo],
) -> None:
    asker, _, _ = pair
    with pytest.raises(Unavailable, match="did not answer") as refused:
        await asker.call("w-answerer", {"slow": 5})
    assert not isinstance(refused.value, WorkerGone)


async def test_a_failing_handler_answers_internal(redis_url: str) -> None:
    async def broken(_: Message) -> Message | None:
        raise RuntimeError("bug")

    asker = RedisWorkerLink(redis_url, "w-asker")
    failing = RedisWorkerLink(redis_url, "w-broken")
    await asker.start(Echo())
    await failing.start(broken)
    try:
        answer = await asker.call("w-broken", {"n": 1})
        assert answer == {
            "ok": False,
            "error": {"code": "internal", "message": "the server failed"},
        }
    finally:
        await asker.stop()
        await failing.stop()


async def test_calls_work_again_after_redis_restarts(restartable_redis: RestartableRedis) -> None:
    asker = RedisWorkerLink(restartable_redis.url, "w-asker", timeout_s=5.0)
    answerer = RedisWorkerLink(restartable_redis.url, "w-answerer", timeout_s=5.0)
    await asker.start(Echo())
    await answerer.start(Echo())
    try:
        assert await asker.call("w-answerer", {"n": 1}) == {"echo": {"n": 1}}
        restartable_redis.kill()
        with pytest.raises(Unavailable):
            await asker.call("w-answerer", {"n": 2})
        restartable_redis.start_again()
        for _ in range(100):  # both resubscribe within a second or so; 20 s at most
            try:
                assert await asker.call("w-answerer", {"n": 3}) == {"echo": {"n": 3}}
                break
            except Unavailable:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("no answer after Redis came back")
    finally:
        await asker.stop()
        await answerer.stop()
