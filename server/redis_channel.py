"""One Redis pub/sub channel between the nodes, surviving Redis going away: messages are
handed to `on_message` one at a time; after an outage the channel subscribes again and calls
`on_resubscribed`, because what was published meanwhile is lost and the caller must catch up
from what is kept elsewhere (the database, the rooms). Publishing while Redis is away is
logged, not raised: the same catching up covers it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

# How often the channel tries to subscribe again while Redis is away.
RESUBSCRIBE_S = 1.0
_REDIS_AWAY = (RedisConnectionError, OSError)


class RedisChannel:
    def __init__(
        self,
        url: str,
        channel: str,
        on_message: Callable[[str], Awaitable[None]],
        on_resubscribed: Callable[[], Awaitable[None]],
    ) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._pubsub = self._redis.pubsub()
        self._channel = channel
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Subscribed before the app serves, so nothing published later is missed.
        await self._pubsub.subscribe(self._channel)
        self._listener = asyncio.ensure_future(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    async def publish(self, message: str) -> bool:
        """False if Redis is away (logged; the receivers catch up when it is back)."""
        try:
            await self._redis.publish(self._channel, message)
        except _REDIS_AWAY:
            log.warning("%s: Redis is unreachable; a message was not published", self._channel)
            return False
        return True

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=None
                )
            except _REDIS_AWAY:
                await self._subscribe_again()
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                await self._on_message(str(message["data"]))
            except Exception:
                # One failed message must not stop this node hearing the next.
                log.exception("%s: handling a message failed", self._channel)

    async def _subscribe_again(self) -> None:
        log.warning("%s: Redis is unreachable; subscribing again", self._channel)
        while True:
            await asyncio.sleep(RESUBSCRIBE_S)
            with contextlib.suppress(*_REDIS_AWAY):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = self._redis.pubsub()
            try:
                await self._pubsub.subscribe(self._channel)
                break
            except _REDIS_AWAY:
                continue
        log.info("%s: subscribed again; catching up", self._channel)
        try:
            await self._on_resubscribed()
        except Exception:
            log.exception("%s: catching up after Redis came back failed", self._channel)
