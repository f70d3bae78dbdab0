"""Recording orders across nodes. Behind one Redis, the room's lock and its log are shared but
a recorder runs on the node where its start was decided: a stop or the end of the session
decided on another node (a participant there, a REST call there) is published on one channel,
and the node holding the recorder carries it out."""

from __future__ import annotations

import json

from rooms.model import ConsultationId, SessionId
from server.recording import SessionRecordings
from server.redis_channel import RedisChannel
from signaling.tasks import TaskSet

_CHANNEL = "telemed:recording-orders"


class RedisRecorderRelay:
    """rooms.room_service.RoomRecorders over several nodes: starts are this node's; stops and
    session ends are carried out here and published for the others."""

    def __init__(self, url: str, local: SessionRecordings, node: str) -> None:
        # Orders lost while Redis was away: each node checks its recorders against the rooms.
        self._channel = RedisChannel(url, _CHANNEL, self._received, local.reconcile)
        self._local = local
        self._node = node
        self._publishing = TaskSet("recording order")

    async def start_listening(self) -> None:
        await self._channel.start()

    async def stop_listening(self) -> None:
        await self._publishing.wait()
        await self._channel.stop()

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

    async def _publish(self, order: dict[str, str]) -> None:
        await self._channel.publish(json.dumps({**order, "node": self._node}))

    async def _received(self, message: str) -> None:
        await self._carry_out(json.loads(message))

    async def _carry_out(self, order: dict[str, str]) -> None:
        if order.get("node") == self._node:
            return  # carried out here already
        cid = ConsultationId(order["cid"])
        if order["op"] == "stop":
            await self._local.stop(cid)
        elif order["op"] == "ended":
            await self._local.stop(cid)
            self._local.session_ended(cid, SessionId(order["sid"]))
