"""Telling every node that a token was revoked, so each ends the connections that presented
it (the namespace's `end_token`). Alone, a node tells itself; with Redis, the revocation is
published on one channel every node listens to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.redis_conn import subscribe_again

log = logging.getLogger(__name__)

# Ends this node's connections of one token id.
EndToken = Callable[[str], Awaitable[None]]
# Ends this node's connections of every token revoked while it was not listening.
Recheck = Callable[[], Awaitable[None]]

_CHANNEL = "telemed:revoked-tokens"
# Between attempts to subscribe again while Redis is away.
RESUBSCRIBE_S = 1.0


class LocalRevocations:
    """One node: a revocation ends its connections at once."""

    def __init__(self, end_token: EndToken) -> None:
        self._end_token = end_token

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def revoked(self, token_id: str) -> None:
        await self._end_token(token_id)


class RedisRevocations:
    """Several nodes: a revocation is published; every node, this one included, receives it
    and ends its own connections of that token."""

    def __init__(self, url: str, end_token: EndToken, recheck: Recheck) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._pubsub = self._redis.pubsub()
        self._end_token = end_token
        self._recheck = recheck
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Subscribed before the app serves, so no revocation published later is missed.
        await self._pubsub.subscribe(_CHANNEL)
        self._listener = asyncio.ensure_future(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pubsub.aclose()
        await self._redis.aclose()

    async def revoked(self, token_id: str) -> None:
        try:
            await self._redis.publish(_CHANNEL, token_id)
        except (RedisConnectionError, OSError):
            # The deny list in the database has it: every node checks its connections
            # against it once it has subscribed again.
            log.warning("revocations: Redis is unreachable; nodes end the token when back")

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=None
                )
            except (RedisConnectionError, OSError):
                await self._subscribe_again()
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                await self._end_token(str(message["data"]))
            except Exception:
                # One failed revocation must not stop this node hearing the next.
                log.exception("ending the connections of a revoked token failed")

    async def _subscribe_again(self) -> None:
        """Redis went away: what was published meanwhile is lost, so once subscribed again the
        deny list in the database decides for every connection this node holds."""
        log.warning("revocations: Redis is unreachable; subscribing again")
        self._pubsub = await subscribe_again(self._redis, self._pubsub, _CHANNEL, RESUBSCRIBE_S)
        log.info("revocations: subscribed again; checking the connections' tokens")
        try:
            await self._recheck()
        except Exception:
            log.exception("checking the tokens after Redis came back failed")
