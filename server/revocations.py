"""Telling every node that a token was revoked, so each ends the connections that presented
it (the namespace's `end_token`). Alone, a node tells itself; with Redis, the revocation is
published on one channel every node listens to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.redis_channel import RedisChannel

# Ends this node's connections of one token id.
EndToken = Callable[[str], Awaitable[None]]
# Ends this node's connections of every token revoked while it was not listening.
Recheck = Callable[[], Awaitable[None]]

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
    and ends its own connections of that token. After Redis was away, the deny list in the
    database decides for every connection this node holds (`recheck`)."""

    def __init__(self, url: str, end_token: EndToken, recheck: Recheck) -> None:
        self._channel = RedisChannel(url, _CHANNEL, end_token, recheck)

    async def start(self) -> None:
        await self._channel.start()

    async def stop(self) -> None:
        await self._channel.stop()

    async def revoked(self, token_id: str) -> None:
        # Stored in the deny list already: a lost message is caught up by `recheck`.
        await self._channel.publish(token_id)
