"""Talking to Redis: a client that survives a restarted Redis, and Redis away (restarting, the
network cut) as `unavailable` to clients, not an internal error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rooms.errors import Unavailable

REDIS_AWAY = (RedisConnectionError, RedisTimeoutError, OSError)


@contextlib.contextmanager
def reachable(what: str) -> Iterator[None]:
    """Turns Redis being away into `Unavailable("<what> is unavailable ...")`."""
    try:
        yield
    except REDIS_AWAY as exc:
        raise Unavailable(f"{what} is unavailable ({type(exc).__name__}); try again") from None


def client(url: str) -> aioredis.Redis:
    """A pooled connection that a restarted Redis cut fails once; one retry on a new one keeps
    a heartbeat or an answer from being lost to that."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )


async def subscribe_again(
    redis: aioredis.Redis, gone: aioredis.client.PubSub, channel: str, every_s: float
) -> aioredis.client.PubSub:
    """A new subscription to `channel` once Redis is back (tried every `every_s`), in place of
    `gone`, whose connection Redis cut. What was published meanwhile is lost."""
    with contextlib.suppress(*REDIS_AWAY):
        await gone.aclose()
    while True:
        await asyncio.sleep(every_s)
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            return pubsub
        except REDIS_AWAY:
            with contextlib.suppress(*REDIS_AWAY):
                await pubsub.aclose()
