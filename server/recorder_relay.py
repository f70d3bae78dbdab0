"""Recording orders across nodes. Behind one Redis, the room's lock and its log are shared but
a recorder runs on the node where its start was decided: a stop or the end of the session
decided on another node (a participant there, a REST call there) is published on one channel,
and the node holding the recorder carries it out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from rooms.model import ConsultationId, SessionId
from server.recording import SessionRecordings
from server.redis_conn import subscribe_again
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

_CHANNEL = "telemed:recording-orders"
# How often a node tries to subscribe again while Redis is away.
RESUBSCRIBE_S = 1.0
_REDIS_AWAY = (RedisConnectionError, OSError)


class RedisRecorderRelay:
    """rooms.room_service.RoomRecorders over several nodes: starts are this node's; stops and
    session ends are carried out here and published for the others."""

    def __init__(self, url: str, local: SessionRecordings, node: str) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._pubsub = self._redis.pubsub()
        self._local = local
        self._node = node
        self._listener: asyncio.Task[None] | None = None
        self._publishing = TaskSet("recording order")

    async def start_listening(self) -> None:
        # Subscribed before the app serves, so no order published later is missed.
        await self._pubsub.subscribe(_CHANNEL)
        self._listener = asyncio.ensure_future(self._listen())

    async def stop_listening(self) -> None:
        await self._publishing.wait()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pubsub.aclose()
        await self._redis.aclose()

    async def start(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        await self._local.start(consultation_id, session_id)

    async def stop(self, consultation_id: ConsultationId) -> None:
        await self._local.stop(consultation_id)
        await self._publish({"op": "stop", "cid": consultation_id})

    def session_ended(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        self._local.session_ended(consultation_id, session_id)
        self._publishing.start(
            self._publish({"op": "ended", "cid": consultation_id, "sid": session_id})
        )

    def adopt(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        self._local.adopt(consultation_id, session_id)

    async def _publish(self, order: dict[str, str]) -> None:
        try:
            await self._redis.publish(_CHANNEL, json.dumps({**order, "node": self._node}))
        except _REDIS_AWAY:
            # Lost; each node checks its recorders against the room once subscribed again.
            log.warning("recording orders: Redis is unreachable; %s not published", order["op"])

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
                await self._carry_out(json.loads(message["data"]))
            except Exception:
                # One failed order must not stop this node hearing the next.
                log.exception("a recording order from another node failed")

    async def _subscribe_again(self) -> None:
        self._pubsub = await subscribe_again(self._redis, self._pubsub, _CHANNEL, RESUBSCRIBE_S)
        try:
            await self._local.reconcile()
        except Exception:
            log.exception("checking the recorders after Redis came back failed")

    async def _carry_out(self, order: dict[str, str]) -> None:
        if order.get("node") == self._node:
            return  # carried out here already
        cid = ConsultationId(order["cid"])
        if order["op"] == "stop":
            await self._local.stop(cid)
        elif order["op"] == "ended":
            await self._local.stop(cid)
            self._local.session_ended(cid, SessionId(order["sid"]))
