"""A room larger than one worker: its receive-only seats (trainees) that reached another
worker — an edge — get their media from that edge, not from the room's worker. The owner pipes
each of the room's tracks once to each such edge (media/pipe.py) and tells it, over the
WorkerLink, which seats to serve; the edge's hub serves them from the piped tracks, and the
edge answers their media events (subscribe answers, layer choices, ICE restarts) itself.
Everything else about those seats — admission, chat, moderation, the record — stays with the
owner (signaling/relaying.py). docs/protocol.md, "Several workers", describes it.

The owner's messages to an edge go in the order they were made (one at a time per edge),
and the edge handles them in that order, one after the other: a track is piped before the
seat that receives it enters, and a seat leaves before its pipe closes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from media.forwarding import Publication
from media.hub import MediaHub, TrackInfo
from media.pipe import KEY_BYTES, Address, PipeEndpoint, PipeIn, PipeOut, new_key
from rooms.outcome import Seat
from signaling.routing import Message, WorkerLink

log = logging.getLogger(__name__)

EDGE_OPS = frozenset(
    {"edge_open", "edge_track", "edge_untrack", "edge_enter", "edge_leave", "edge_close"}
)
# The media events of a seat an edge serves, answered by the edge.
EDGE_SERVED_EVENTS = frozenset({"subscribe_answer", "set_layer", "restart_subscribe"})


class EdgeMessageInvalid(ValueError):
    """A worker sent an edge message this worker cannot read (a version mismatch, a bug)."""


@dataclass
class _OwnerPipe:
    """On the owner: the pipe of one room to one edge, and the seats it is there for."""

    pipe: PipeOut
    seats: set[str] = field(default_factory=set)
    ssrcs: dict[str, int] = field(default_factory=dict)  # by track id


@dataclass
class _EdgeRoom:
    """On an edge: one room whose seats it serves from its owner's pipe."""

    owner: str
    pipe: PipeIn
    seats: dict[str, str] = field(default_factory=dict)  # participant -> connection
    ssrcs: dict[str, int] = field(default_factory=dict)  # by track id


class EdgeMedia:
    def __init__(
        self,
        hub: MediaHub,
        endpoint: PipeEndpoint,
        link: WorkerLink,
        worker_id: str,
        seats: dict[tuple[str, str], str],
    ) -> None:
        self._hub = hub
        self._endpoint = endpoint
        self._link = link
        self._me = worker_id
        # The namespace's map of which connection holds each seat (for the offers it sends).
        self._seats = seats
        # The owner's side.
        self._out: dict[tuple[str, str], _OwnerPipe] = {}  # by (room, edge)
        self._at_edge: dict[tuple[str, str], str] = {}  # (room, participant) -> edge
        self._sending: dict[str, asyncio.Lock] = {}  # by edge: one message at a time
        # The edge's side.
        self._rooms: dict[str, _EdgeRoom] = {}
        self._by_connection: dict[str, tuple[str, str]] = {}  # -> (room, participant)
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    @property
    def pipe_address(self) -> Address:
        return self._endpoint.address

    async def start(self) -> None:
        await self._endpoint.start()
        self._worker = asyncio.create_task(self._handle_inbox(), name="edge-media")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for room in list(self._rooms):
            await self._close(room)
        await self._endpoint.stop()

    # --- the room's worker ------------------------------------------------------------------

    @staticmethod
    def served_at_edge(seat: Seat, edge: str | None, edge_pipe: Address | None) -> bool:
        """Whether the owner hands `seat`'s media to the edge holding its socket."""
        return (
            edge is not None
            and edge_pipe is not None
            and seat.may_subscribe
            and not (seat.may_publish)
        )

    def edge_of(self, room: str, participant: str) -> str | None:
        return self._at_edge.get((room, participant))

    async def seat(
        self, room: str, participant: str, connection: str, edge: str, edge_pipe: Address
    ) -> None:
        pipe = self._out.get((room, edge))
        if pipe is None:
            pipe = _OwnerPipe(self._endpoint.open_out(edge_pipe, new_key()))
            self._out[(room, edge)] = pipe
            host, port = self._endpoint.address
            await self._tell(
                edge,
                {
                    "op": "edge_open",
                    "room": room,
                    "owner": self._me,
                    "pipe_id": pipe.pipe.pipe_id,
                    "key": base64.b64encode(pipe.pipe.key).decode(),
                    "address": [host, port],
                },
            )
            for info, publication in self._hub.publications(room):
                await self._pipe_track(edge, pipe, room, info, publication)
        pipe.seats.add(participant)
        self._at_edge[(room, participant)] = edge
        await self._tell(
            edge,
            {"op": "edge_enter", "room": room, "participant": participant, "sid": connection},
        )

    async def unseat(self, room: str, participant: str) -> bool:
        """The seat's media, if an edge serves it, goes (and the pipe with its last seat).
        False if no edge serves it."""
        edge = self._at_edge.pop((room, participant), None)
        if edge is None:
            return False
        await self._tell(edge, {"op": "edge_leave", "room": room, "participant": participant})
        pipe = self._out.get((room, edge))
        if pipe is not None:
            pipe.seats.discard(participant)
            if not pipe.seats:
                del self._out[(room, edge)]
                pipe.pipe.close()
                await self._tell(edge, {"op": "edge_close", "room": room})
        return True

    async def track_published(self, room: str, info: TrackInfo, publication: Publication) -> None:
        for (piped_room, edge), pipe in list(self._out.items()):
            if piped_room == room:
                await self._pipe_track(edge, pipe, room, info, publication)

    async def track_unpublished(self, room: str, info: TrackInfo) -> None:
        for (piped_room, edge), pipe in list(self._out.items()):
            ssrc = pipe.ssrcs.pop(info.track_id, None) if piped_room == room else None
            if ssrc is not None:
                pipe.pipe.remove(ssrc)
                await self._tell(
                    edge, {"op": "edge_untrack", "room": room, "track_id": info.track_id}
                )

    def edge_gone(self, edge: str) -> None:
        """A dead edge's pipes stop (its seats are dropped by the relaying code)."""
        for (room, to), pipe in list(self._out.items()):
            if to == edge:
                pipe.pipe.close()
                del self._out[(room, to)]
        for key, to in list(self._at_edge.items()):
            if to == edge:
                del self._at_edge[key]

    async def _pipe_track(
        self, edge: str, pipe: _OwnerPipe, room: str, info: TrackInfo, publication: Publication
    ) -> None:
        if info.track_id in pipe.ssrcs:
            return
        ssrc = pipe.pipe.add(publication)
        pipe.ssrcs[info.track_id] = ssrc
        await self._tell(
            edge, {"op": "edge_track", "room": room, "track": info.public(), "ssrc": ssrc}
        )

    async def _tell(self, edge: str, message: Message) -> None:
        lock = self._sending.setdefault(edge, asyncio.Lock())
        async with lock:
            await self._link.tell(edge, message)

    # --- the edge ---------------------------------------------------------------------------

    def received(self, message: Message) -> None:
        """An owner's message (the WorkerLink's handler calls this synchronously, so messages
        queue in the order they arrived)."""
        self._inbox.put_nowait(message)

    def seat_of(self, connection: str) -> tuple[str, str] | None:
        """(room, participant) of the seat this edge serves on `connection`, if any."""
        return self._by_connection.get(connection)

    async def owners_gone(self, owners: set[str]) -> None:
        """Rooms whose worker died: their media here ends (the clients reconnect and are
        placed again)."""
        for room, served in list(self._rooms.items()):
            if served.owner in owners:
                log.warning("room %s: its worker is gone; its media here ends", room)
                await self._close(room)

    async def _handle_inbox(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self._handle(message)
            except EdgeMessageInvalid as exc:
                log.error("edge message %r refused: %s", str(message.get("op"))[:32], exc)
            except Exception:
                # The inbox must outlive any one message.
                log.exception("edge message %r failed", str(message.get("op"))[:32])

    async def _handle(self, message: Message) -> None:
        op = message.get("op")
        room = _text(message, "room")
        if op == "edge_open":
            if room in self._rooms:
                await self._close(room)  # a new owner's pipe replaces the last one's
            self._rooms[room] = _EdgeRoom(
                _text(message, "owner"),
                self._endpoint.open_in(
                    read_address(message.get("address")),
                    _number(message, "pipe_id"),
                    _key(message.get("key")),
                    self._hub.counters,
                ),
            )
            return
        served = self._rooms.get(room)
        if served is None:
            return  # closed meanwhile
        if op == "edge_track":
            info = _track(message.get("track"))
            ssrc = _number(message, "ssrc")
            served.ssrcs[info.track_id] = ssrc
            await self._hub.add_piped(room, info, served.pipe.add(ssrc, info.kind))
        elif op == "edge_untrack":
            track_id = _text(message, "track_id")
            gone = served.ssrcs.pop(track_id, None)
            if gone is not None:
                await self._hub.remove_piped(room, track_id)
                served.pipe.remove(gone)
        elif op == "edge_enter":
            participant, connection = _text(message, "participant"), _text(message, "sid")
            served.seats[participant] = connection
            self._seats[(room, participant)] = connection
            self._by_connection[connection] = (room, participant)
            await self._hub.enter(room, participant, may_subscribe=True)
        elif op == "edge_leave":
            participant = _text(message, "participant")
            await self._leave(room, served, participant)
        elif op == "edge_close":
            await self._close(room)

    async def _leave(self, room: str, served: _EdgeRoom, participant: str) -> None:
        connection = served.seats.pop(participant, None)
        if connection is not None:
            self._by_connection.pop(connection, None)
            if self._seats.get((room, participant)) == connection:
                del self._seats[(room, participant)]
        await self._hub.leave(room, participant)

    async def _close(self, room: str) -> None:
        served = self._rooms.pop(room, None)
        if served is None:
            return
        for participant in list(served.seats):
            await self._leave(room, served, participant)
        await self._hub.close_room(room)
        served.pipe.close()


def _text(message: Message, name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise EdgeMessageInvalid(f"{name} must be a non-empty string")
    return value


def _number(message: Message, name: str) -> int:
    value = message.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 32:
        raise EdgeMessageInvalid(f"{name} must be a 32-bit number above 0")
    return value


def read_address(value: Any) -> Address:
    """A pipe socket's address as workers send it: [host, port]."""
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 < value[1] < 65536
    ):
        raise EdgeMessageInvalid("address must be [host, port]")
    return value[0], value[1]


def _key(value: Any) -> bytes:
    try:
        key = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise EdgeMessageInvalid("key must be base64") from None
    if len(key) != KEY_BYTES:
        raise EdgeMessageInvalid(f"key must be {KEY_BYTES} bytes")
    return key


def _track(value: Any) -> TrackInfo:
    if not isinstance(value, dict):
        raise EdgeMessageInvalid("track must be an object")
    fields = {name: value.get(name) for name in ("track_id", "participant", "kind", "source")}
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise EdgeMessageInvalid("track needs track_id, participant, kind and source")
    if fields["kind"] not in ("audio", "video"):
        raise EdgeMessageInvalid("track kind must be audio or video")
    return TrackInfo(**{k: str(v) for k, v in fields.items()})
