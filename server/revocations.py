"""Telling every node that a token was revoked, so each ends the connections that presented
it (the namespace's `end_token`). Alone, a node tells itself; with Redis, the revocation is
published on one channel every node listens to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# Ends this node's connections of one token id.
EndToken = Callable[[str], Awaitable[None]]

_CHANNEL = "telemed:revoked-tokens"


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

    def __init__(self, url: str, end_token: EndToken) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._pubsub = self._redis.pubsub()
        self._end_token = end_token
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
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    async def revoked(self, token_id: str) -> None:
        await self._redis.publish(_CHANNEL, token_id)

    async def _listen(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is None or message.get("type") != "message":
                continue
            try:
                await self._end_token(str(message["data"]))
            except Exception:
                # One failed revocation must not stop this node hearing the next.
                log.exception("ending the connections of a revoked token failed")
