"""The namespace's side of several workers (signaling/routing.py): a join relayed to the
room's worker and every later event of that connection after it; the room's worker's side
(the connections relayed to it); dead workers noticed; a room taken over at its first join on
a worker. A mixin of ConsultNamespace, which holds the connections and handles the events."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import socketio

from media.hub import MediaError, MediaHub
from media.layers import Layer
from rooms.errors import Unavailable
from rooms.model import ConsultationId, ParticipantId
from rooms.outcome import Outcome
from rooms.room_service import LiveRoomService
from signaling import events as ev
from signaling.connection import Connection, Identity, Limits
from signaling.edge_media import (
    EDGE_OPS,
    EDGE_SERVED_EVENTS,
    EdgeMedia,
    EdgeMessageInvalid,
    read_address,
)
from signaling.ratelimit import TokenBucket
from signaling.routing import Message, Routing, WorkerGone
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

# How often a worker checks that the other ends of its relayed connections are alive, and
# how long one must have been missing to count as dead (a restarted Redis has forgotten every
# worker until their next heartbeats, a second later).
PEER_WATCH_S = 1.0
PEER_LOST_AFTER_S = 3.0
# A join whose room's worker just died waits (polling) for the room to be placed again.
WORKER_GONE_WAIT_S = 6.0
WORKER_GONE_RETRY_S = 0.5


class Relaying:
    """Needs the host's connections, dispatch and life-cycle methods (declared below)."""

    if TYPE_CHECKING:
        _routing: Routing | None
        _connections: dict[str, Connection]
        _config: Limits
        _rooms: LiveRoomService
        _timers: TaskSet
        _taken_over: dict[ConsultationId, asyncio.Future[None]]
        _edge_media: EdgeMedia | None
        _media: MediaHub
        server: Any
        namespace: str

        async def _handle(
            self, sid: str, conn: Connection, event: Any, name: str, data: Any
        ) -> dict[str, Any]: ...
        async def _screen(
            self, sid: str, conn: Connection, event: Any, name: str, data: Any
        ) -> dict[str, Any] | tuple[Any, Any]: ...
        async def _verify(self, sid: str, auth: Any) -> Identity: ...
        async def _error(self, sid: str, event: str, code: str, message: str) -> dict[str, Any]: ...
        async def _on_disconnect(self, sid: str) -> None: ...
        async def _apply(self, outcome: Outcome) -> None: ...
        async def _expire_later(
            self, cid: ConsultationId, participant: ParticipantId, since: datetime
        ) -> None: ...
        async def disconnect(self, sid: str) -> None: ...

    async def _route_join(
        self, sid: str, conn: Connection, body: ev.Join, data: Any
    ) -> dict[str, Any] | None:
        """Joins on the room's worker if that is another: the join's ack, or None to join here."""
        assert self._routing is not None
        routing = self._routing
        deadline = time.monotonic() + WORKER_GONE_WAIT_S
        while True:
            placed = await routing.placement.owner_of(ConsultationId(body.consultation_id))
            if placed.owner == routing.placement.worker_id:
                return None
            attach = {
                "op": "attach",
                "sid": sid,
                "auth": conn.auth,
                "edge": routing.placement.worker_id,
            }
            if self._edge_media is not None:
                # Where the owner pipes tracks if it lets this worker serve the seat's media.
                attach["pipe"] = list(self._edge_media.pipe_address)
            try:
                attached = await routing.link.call(placed.owner, attach)
                break
            except WorkerGone:
                # Died a moment ago: the room is placed again once its heartbeat lapses.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(WORKER_GONE_RETRY_S)
        if attached.get("ok") is not True:
            message = str(attached.get("message", "refused"))
            return await self._error(sid, "join", "refused", message)
        conn.owner = placed.owner
        return await routing.link.call(
            placed.owner, {"op": "event", "sid": sid, "event": "join", "data": data}
        )

    async def _relay(
        self, sid: str, conn: Connection, event: Any, name: str, data: Any
    ) -> dict[str, Any]:
        """An event of a connection whose room is on another worker: screened here (nothing
        unreadable or over the limits crosses), handled there."""
        assert self._routing is not None and conn.owner is not None
        screened = await self._screen(sid, conn, event, name, data)
        if isinstance(screened, dict):
            return screened
        seat = self._edge_media.seat_of(sid) if self._edge_media is not None else None
        if seat is not None and name in EDGE_SERVED_EVENTS:
            return await self._serve_at_edge(sid, name, screened[1], *seat)
        try:
            return await self._routing.link.call(
                conn.owner, {"op": "event", "sid": sid, "event": name, "data": data}
            )
        except Unavailable as exc:
            return await self._error(sid, name, exc.code, str(exc))

    async def _serve_at_edge(
        self, sid: str, name: str, body: Any, room: str, participant: str
    ) -> dict[str, Any]:
        """A media event of a seat this edge serves (signaling/edge_media.py): the seat's
        connection is the one its owner named, so it may answer its own offers."""
        try:
            if isinstance(body, ev.SubscribeAnswer):
                await self._media.accept_answer(room, participant, body.sdp)
                return {"ok": True}
            if isinstance(body, ev.SetLayer):
                layer = None if body.layer == "auto" else Layer(body.layer)
                count = self._media.set_layer(room, participant, body.track_id, layer)
                return {"ok": True, "result": {"tracks": count}}
            restarted = await self._media.restart_subscribe(room, participant)
            return {"ok": True, "result": {"subscribe": restarted}}
        except MediaError as exc:
            return await self._error(sid, name, "media_error", str(exc))

    async def relayed(self, message: Message) -> Message | None:
        """A request from an edge worker about one of its connections (the WorkerLink's
        handler), or an owner's message about the seats this worker serves as its edge.
        Workers trust each other: Redis is theirs alone."""
        op = message.get("op")
        if op in EDGE_OPS:
            # Queued before anything is awaited: the owner's messages keep their order.
            if self._edge_media is not None:
                self._edge_media.received(message)
            return None
        sid = str(message.get("sid", ""))
        if op == "attach":
            return await self._attach(
                sid, message.get("auth"), str(message.get("edge", "")), message.get("pipe")
            )
        conn = self._connections.get(sid)
        if op == "disconnect":
            if conn is not None and conn.owner is not None:
                async with conn.lock:  # held while an event of it is relayed
                    await self.disconnect(sid)
            return None
        if conn is None or conn.edge is None:
            if op == "event":
                return {"ok": False, "error": {"code": "not_connected", "message": "reconnect"}}
            return None
        if op == "event":
            name = str(message.get("event", ""))
            return await self._handle(sid, conn, name, name, message.get("data"))
        if op == "detach":
            await self._on_disconnect(sid)
        return None

    async def _attach(self, sid: str, auth: Any, edge: str, pipe: Any) -> Message:
        try:
            identity = await self._verify(sid, auth)
        except socketio.exceptions.ConnectionRefusedError as exc:
            return {"ok": False, "message": str(exc.error_args.get("message", "refused"))}
        try:
            edge_pipe = read_address(pipe) if pipe is not None else None
        except EdgeMessageInvalid:
            edge_pipe = None  # its seats' media is then served here
        self._connections[sid] = Connection(
            identity,
            TokenBucket(self._config.events_per_second, self._config.event_burst),
            edge=edge,
            edge_pipe=edge_pipe,
        )
        return {"ok": True}

    async def _watch_peers(self) -> None:
        """A worker that died takes its side of the relayed connections with it: an edge's
        sockets whose room's worker died are closed so the clients reconnect (and are placed
        again); an owner's connections from a dead edge are dropped like a lost socket."""
        missing_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(PEER_WATCH_S)
            try:
                await self._drop_dead_peers(missing_since)
            except Unavailable:
                pass  # Redis away: nobody's heartbeat can be told either way
            except Exception:
                # The watch must outlive any one failed round.
                log.exception("checking the relayed connections' workers failed")

    async def _drop_dead_peers(self, missing_since: dict[str, float]) -> None:
        assert self._routing is not None
        peers = {p for c in self._connections.values() for p in (c.owner, c.edge) if p}
        alive = await self._routing.placement.alive(peers)
        now = time.monotonic()
        for peer in list(missing_since):
            if peer in alive or peer not in peers:
                del missing_since[peer]
        for peer in peers - alive:
            missing_since.setdefault(peer, now)
        dead = {p for p, since in missing_since.items() if now - since >= PEER_LOST_AFTER_S}
        if self._edge_media is not None and dead:
            # The pipes to dead edges stop now; those from dead owners end with their rooms.
            for peer in dead:
                self._edge_media.edge_gone(peer)
            await self._edge_media.owners_gone(dead)
        for sid, conn in list(self._connections.items()):
            if conn.owner is not None and conn.owner in dead:
                log.warning("closing %s: the worker of its room is gone", sid)
                await self._close_transport(sid)
            elif conn.edge is not None and conn.edge in dead:
                await self._on_disconnect(sid)

    async def _close_transport(self, sid: str) -> None:
        """Drops the socket as a crash would: no Engine.IO CLOSE packet (after one, clients
        do not reconnect), then the writer is released so the WebSocket closes. The client
        sees a lost transport and reconnects by itself. python-engineio has no public way to
        do this: its socket's `close(abort=True)` and queue (tests/test_workers_failover.py
        would fail without them)."""
        eio_sid = self.server.manager.eio_sid_from_sid(sid, self.namespace)
        socket = self.server.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if socket is None:
            await self._on_disconnect(sid)
            return
        await socket.close(wait=False, abort=True)
        socket.queue.put_nowait(None)

    async def _take_over_once(self, cid: ConsultationId) -> None:
        """Before the first join of a room on this worker: every seat presence still shows as
        connected is a dead worker's (a live room's seats are all served by its one worker),
        so it is kept for the reconnect grace like any dropped seat, and a recording the dead
        worker was making goes on here. Later joins wait for it."""
        pending = self._taken_over.get(cid)
        if pending is None:
            pending = asyncio.ensure_future(self._take_over(cid))
            self._taken_over[cid] = pending
        try:
            await asyncio.shield(pending)
        except Exception:
            if self._taken_over.get(cid) is pending:
                del self._taken_over[cid]  # the next join tries again
            raise

    async def _take_over(self, cid: ConsultationId) -> None:
        outcome, seats = await self._rooms.take_over(cid)
        for participant, since in seats:
            self._timers.start(self._expire_later(cid, participant, since))
        if seats:
            log.warning("took over room %s: %d seat(s) of a lost worker", cid, len(seats))
        await self._apply(outcome)
