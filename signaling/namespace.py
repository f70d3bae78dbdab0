"""The `/consult` socket.io namespace: authenticates connections, validates every event,
hands it to the live-room service and delivers what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import socketio
from pydantic import BaseModel, ValidationError

from media.hub import MediaError, MediaHub, TrackInfo
from media.layers import Layer
from media.peer import PeerConfig
from media.pipe import PipeEndpoint
from rooms.consultations import RequestContext
from rooms.errors import DomainError, RoomRefused, Unavailable
from rooms.lifecycle import Action
from rooms.model import Consultation, ConsultationId, ParticipantId, TrackSource
from rooms.outcome import Audience, Outcome, Target
from rooms.recording_rules import RECORDER_ID
from rooms.room_service import LiveRoomService, Stroke
from signaling import events as ev
from signaling.connection import (
    Authenticate,
    Connection,
    EventCounts,
    Identity,
    Limits,
    Refused,
)
from signaling.edge_media import EdgeMedia
from signaling.packets import Unreadable, event_problem, payload_problem
from signaling.ratelimit import TokenBucket
from signaling.relaying import Relaying
from signaling.routing import Routing
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

NAMESPACE = "/consult"
# How often a disconnect that presence could not take (Redis away) is tried again.
UNAVAILABLE_RETRY_S = 1.0


# Announcements that count as something happening (each once per outcome where it is sent to
# every connection: a session ends once, however many are told).
_COUNTED = {
    "participant_joined": "seat_taken",
    "participant_left": "participant_left",
    "chat_message": "chat_message",
    "recording_started": "recording_started",
    "recording_failed": "recording_failed",
}
_COUNTED_ONCE = {"session_ended": "session_ended"}


@dataclass(frozen=True)
class EventSpec:
    model: type[BaseModel]
    handler: Callable[[str, Connection, Any], Awaitable[Outcome]]
    needs_room: bool = True


class ConsultNamespace(Relaying, socketio.AsyncNamespace):  # type: ignore[misc]
    def __init__(
        self,
        rooms: LiveRoomService,
        authenticate: Authenticate,
        limits: Limits,
        peer_config: PeerConfig,
        counts: EventCounts | None = None,
        routing: Routing | None = None,
        pipe: PipeEndpoint | None = None,
    ) -> None:
        super().__init__(NAMESPACE)
        self._counts = counts
        self._routing = routing
        self._peer_watch: asyncio.Task[None] | None = None
        self._rooms = rooms
        self._media = MediaHub(peer_config, self._send_subscribe_offer, self._send_layer)
        # Which connection holds each seat, to deliver its subscribe offers.
        self._seats: dict[tuple[str, str], str] = {}
        # Receive-only seats served by the worker holding their sockets (a room larger than
        # one worker): both sides of it.
        self._edge_media = (
            EdgeMedia(self._media, pipe, routing.link, routing.placement.worker_id, self._seats)
            if routing is not None and pipe is not None
            else None
        )
        self._authenticate = authenticate
        self._config = limits
        self._connections: dict[str, Connection] = {}
        # Connects whose token is being verified, and the tokens revoked meanwhile: a token
        # found valid just before its revocation must not connect just after it. Emptied
        # whenever no connect is in flight, so it stays as small as the overlap.
        self._verifying = 0
        self._revoked_while_verifying: set[str] = set()
        self._timers = TaskSet("signaling timer")
        self._empty_watch: dict[ConsultationId, asyncio.Future[None]] = {}
        # Rooms this worker has taken over (or found empty) at their first join here.
        self._taken_over: dict[ConsultationId, asyncio.Future[None]] = {}
        self._events: dict[str, EventSpec] = {
            "join": EventSpec(ev.Join, self._join, needs_room=False),
            "leave": EventSpec(ev.Empty, self._leave),
            "admit": EventSpec(ev.Admit, self._admit),
            "deny": EventSpec(ev.Deny, self._deny),
            "chat": EventSpec(ev.Chat, self._chat),
            "raise_hand": EventSpec(ev.Empty, self._raise_hand),
            "lower_hand": EventSpec(ev.Empty, self._lower_hand),
            "mute": EventSpec(ev.Mute, self._mute),
            "remove": EventSpec(ev.Remove, self._remove),
            "consent": EventSpec(ev.GiveConsent, self._consent),
            "annotate": EventSpec(ev.Annotate, self._annotate),
            "pointer": EventSpec(ev.Pointer, self._pointer),
            "set_trainee_chat": EventSpec(ev.TraineeChat, self._set_trainee_chat),
            "end_session": EventSpec(ev.Empty, self._end_session),
            "start_recording": EventSpec(ev.Empty, self._start_recording),
            "stop_recording": EventSpec(ev.Empty, self._stop_recording),
            "publish_offer": EventSpec(ev.PublishOffer, self._publish_offer),
            "subscribe_answer": EventSpec(ev.SubscribeAnswer, self._subscribe_answer),
            "set_layer": EventSpec(ev.SetLayer, self._set_layer),
            "restart_subscribe": EventSpec(ev.Empty, self._restart_subscribe),
        }

    @property
    def handled_events(self) -> frozenset[str]:
        return frozenset(self._events)

    @property
    def connection_count(self) -> int:
        """Sockets this worker holds (not those another worker relays to it)."""
        return sum(1 for c in self._connections.values() if c.edge is None)

    def holds(self, connection: str) -> bool:
        """Whether `connection` (a socket id) holds a seat served by this worker (its own
        sockets and those relayed to it, not those it relays to another)."""
        conn = self._connections.get(connection)
        return conn is not None and conn.owner is None

    def rooms_served(self) -> set[ConsultationId]:
        """The rooms whose seats this worker serves (placed here)."""
        return {
            c.consultation_id
            for c in self._connections.values()
            if c.consultation_id is not None and c.owner is None
        }

    @property
    def media(self) -> MediaHub:
        return self._media

    async def transition(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        action: Action,
        *,
        reason: str | None = None,
        scheduled_time: datetime | None = None,
    ) -> Consultation:
        """A life-cycle action from the API, through the live room when it ends the open
        session (LiveRoomService.transition); what comes of it is delivered here."""
        consultation, outcome = await self._rooms.transition(
            ctx, consultation_id, action, reason=reason, scheduled_time=scheduled_time
        )
        await self._apply(outcome)
        return consultation

    async def deliver(self, outcome: Outcome) -> None:
        """What a use case outside the room decided to announce (an attachment added over the
        API during a session)."""
        await self._apply(outcome)

    async def start(self) -> None:
        if self._edge_media is not None:
            await self._edge_media.start()
        if self._routing is not None:
            self._peer_watch = asyncio.create_task(self._watch_peers(), name="relay-peers")

    async def stop(self) -> None:
        if self._peer_watch is not None:
            self._peer_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._peer_watch
        await self._timers.cancel_all()
        if self._edge_media is not None:
            await self._edge_media.stop()
        await self._media.stop()

    # --- dispatch ----------------------------------------------------------------------------

    async def trigger_event(self, event: Any, *args: Any) -> Any:
        sid: str = args[0]
        # socket.io delivers its own connect/disconnect through here too, but a client can also
        # emit events by those names: only the server's own are life-cycle events.
        if event == "connect" and sid not in self._connections:
            return await self._on_connect(sid, args[2] if len(args) > 2 else None)
        if event == "disconnect" and not self.server.manager.is_connected(sid, self.namespace):
            return await self._on_disconnect(sid)
        data = args[1] if len(args) == 2 else list(args[1:]) if len(args) > 2 else None
        # What the `event` field of a refusal names: "" when the name is not a string.
        name = (
            event
            if isinstance(event, str)
            else event.event
            if isinstance(event, Unreadable)
            else ""
        )
        conn = self._connections.get(sid)
        if conn is None:
            return await self._error(sid, name, "not_connected", "connect first")
        return await self._handle(sid, conn, event, name, data)

    async def _handle(
        self, sid: str, conn: Connection, event: Any, name: str, data: Any
    ) -> dict[str, Any]:
        async with conn.lock:
            try:
                if conn.owner is not None:
                    return await self._relay(sid, conn, event, name, data)
                ack = await self._dispatch(sid, conn, event, name, data)
                if self._counts is not None:
                    # Only the namespace's own event names: a client cannot add series.
                    known = name if name in self._events else "other"
                    self._counts.event(known, ack.get("ok") is True)
                return ack
            except Exception:
                # Nothing a client sends may take the namespace down.
                log.exception("event %r failed", name[:64])
                return await self._error(sid, name, "internal", "the server could not handle this")

    async def _dispatch(
        self, sid: str, conn: Connection, event: Any, name: str, data: Any
    ) -> dict[str, Any]:
        screened = await self._screen(sid, conn, event, name, data)
        if isinstance(screened, dict):
            return screened
        spec, body = screened
        if spec.needs_room and conn.consultation_id is None:
            return await self._error(sid, name, "not_in_room", "join a consultation first")
        try:
            if isinstance(body, ev.Join) and conn.edge is None and self._routing is not None:
                relayed = await self._route_join(sid, conn, body, data)
                if relayed is not None:
                    return relayed
            outcome = await spec.handler(sid, conn, body)
        except DomainError as exc:
            return await self._error(sid, name, exc.code, str(exc))
        except MediaError as exc:
            return await self._error(sid, name, "media_error", str(exc))
        await self._apply(outcome)
        return {"ok": True, **({"result": outcome.reply} if outcome.reply else {})}

    async def _screen(
        self, sid: str, conn: Connection, event: Any, name: str, data: Any
    ) -> dict[str, Any] | tuple[EventSpec, BaseModel]:
        """What every event goes through before its handler, on the edge and the owner alike:
        the refusal's ack, or the event's spec and validated body."""
        if not conn.bucket.take():
            return await self._error(sid, name, "rate_limited", "too many events; slow down")
        # A packet the decoder could not read (signaling/packets.py) says why in its place.
        unreadable = event if isinstance(event, Unreadable) else event_problem([event])
        if unreadable is not None:
            code = unreadable.code
            return await self._error(sid, name, code, unreadable.message)
        spec = self._events.get(name)
        if spec is None:
            return await self._error(sid, name, "unknown_event", f"no event named {name[:64]!r}")
        if conn.revoked:
            return await self._error(sid, name, "token_revoked", "your token has been revoked")
        if conn.identity.expires_at <= datetime.now(UTC):
            refusal = await self._error(
                sid, name, "token_expired", "your token has expired; reconnect with a new one"
            )
            # An expired token keeps nothing open, not even the broadcasts; the refusal and
            # its ack go out first.
            self._timers.start(self._disconnect([sid]))
            return refusal
        problem = payload_problem(data)
        if problem is not None:
            return await self._error(sid, name, "invalid_payload", problem)
        size = _encoded_size(data)
        if size > self._config.max_payload_bytes:
            return await self._error(
                sid,
                name,
                "payload_too_large",
                f"payload is {size} bytes; the limit is {self._config.max_payload_bytes}",
            )
        try:
            body = spec.model.model_validate({} if data is None else data)
        except ValidationError as exc:
            return await self._error(sid, name, "invalid_payload", _describe(exc))
        return spec, body

    async def _error(self, sid: str, event: str, code: str, message: str) -> dict[str, Any]:
        if code != "rate_limited":  # a flood would flood the log too
            # The client's event name as a repr: quoted, control characters escaped.
            log.info("refused %r from %s: %s", event[:64], sid, code)
        error = {"code": code, "message": message, "event": event[:64]}
        await self.emit("error", error, to=sid)
        return {"ok": False, "error": error}

    async def _apply(self, outcome: Outcome) -> None:
        self._count(outcome)
        for m in outcome.memberships:
            room = _room_name(m.audience, m.consultation_id)
            if m.enter:
                await self.enter_room(m.connection, room)
            else:
                await self.leave_room(m.connection, room)
        await self._apply_media(outcome)
        for a in outcome.announcements:
            to = (
                a.to.key
                if a.to.audience is Audience.CONNECTION
                else _room_name(a.to.audience, a.to.key)
            )
            await self.emit(a.event, a.payload, to=to, skip_sid=a.skip_connection)
        if self._routing is not None:
            for ended in outcome.ended:
                self._taken_over.pop(ended, None)
                with contextlib.suppress(Unavailable):
                    # Left standing, it is placed again by the next join: harmless.
                    await self._routing.placement.release(ended)
        if outcome.disconnects:
            # In a task of its own, so the ack of the event that caused it goes out first
            # (nothing here may wait after this).
            self._timers.start(self._disconnect(outcome.disconnects))

    def _count(self, outcome: Outcome) -> None:
        if self._counts is None:
            return
        once: set[str] = set()
        for a in outcome.announcements:
            who = a.payload.get("participant_id", a.payload.get("participant"))
            if a.event in _COUNTED and who != RECORDER_ID:
                self._counts.happened(_COUNTED[a.event])
            elif a.event in _COUNTED_ONCE and a.event not in once:
                once.add(a.event)
                self._counts.happened(_COUNTED_ONCE[a.event])

    async def _apply_media(self, outcome: Outcome) -> None:
        """Media follows seats: a seat gone takes its tracks with it, a new seat receives the
        room's tracks, a forced mute stops forwarding at once."""
        edges = self._edge_media
        for cid, participant in outcome.unseated:
            self._seats.pop((cid, participant), None)
            if edges is not None and await edges.unseat(cid, participant):
                continue
            for gone in await self._media.leave(cid, participant):
                await self.emit(
                    "track_unpublished", gone.public(), to=_room_name(Audience.ROOM, cid)
                )
                if edges is not None:
                    await edges.track_unpublished(cid, gone)
        for seat in outcome.seated:
            self._seats[(seat.consultation_id, seat.participant_id)] = seat.connection
            conn = self._connections.get(seat.connection)
            if (
                edges is not None
                and conn is not None
                and edges.served_at_edge(seat, conn.edge, conn.edge_pipe)
            ):
                assert conn.edge is not None and conn.edge_pipe is not None
                await edges.seat(
                    seat.consultation_id,
                    seat.participant_id,
                    seat.connection,
                    conn.edge,
                    conn.edge_pipe,
                )
                continue
            await self._media.enter(seat.consultation_id, seat.participant_id, seat.may_subscribe)
        for seat in outcome.moved:
            # The same peer connections, reached over a new signaling connection: an offer
            # that went to the old one goes again (the client then restarts ICE on both).
            self._seats[(seat.consultation_id, seat.participant_id)] = seat.connection
            await self._media.resend_offer(seat.consultation_id, seat.participant_id)
        for cid, participant, kind in outcome.muted:
            if participant in self._media.members(cid):
                self._media.pause(cid, participant, kind, paused=True)

    async def _send_subscribe_offer(
        self, room: str, participant: str, sdp: str, tracks: dict[str, TrackInfo]
    ) -> None:
        sid = self._seats.get((room, participant))
        if sid is not None:
            await self.emit(
                "subscribe_offer",
                {"sdp": sdp, "tracks": {mid: info.public() for mid, info in tracks.items()}},
                to=sid,
            )

    async def _send_layer(
        self, room: str, participant: str, track: TrackInfo, layer: Layer
    ) -> None:
        sid = self._seats.get((room, participant))
        if sid is not None:
            await self.emit("layer_changed", {**track.public(), "layer": layer.value}, to=sid)

    async def _disconnect(self, sids: list[str]) -> None:
        for sid in sids:
            conn = self._connections.get(sid)
            if conn is not None and conn.edge is not None and self._routing is not None:
                # The edge disconnects it once the ack of the event that caused it has gone
                # out (socket.io's own disconnect could overtake the ack relayed back).
                await self._routing.link.tell(conn.edge, {"op": "disconnect", "sid": sid})
            else:
                await self.disconnect(sid)

    # --- connection life cycle ---------------------------------------------------------------

    async def _on_connect(self, sid: str, auth: Any) -> bool:
        identity = await self._verify(sid, auth)
        self._connections[sid] = Connection(
            identity,
            TokenBucket(self._config.events_per_second, self._config.event_burst),
            auth=auth if self._routing is not None else None,
        )
        return True

    async def _verify(self, sid: str, auth: Any) -> Identity:
        """The identity the auth payload proves; raises ConnectionRefusedError, whose message
        the client sees, if it proves none."""
        problem = auth.message if isinstance(auth, Unreadable) else payload_problem(auth)
        if problem is not None:
            log.info("connection %s refused: unreadable auth payload", sid)
            raise socketio.exceptions.ConnectionRefusedError(
                f"the auth payload is unreadable: {problem}"
            )
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            log.info("connection %s refused: no token", sid)
            raise socketio.exceptions.ConnectionRefusedError("missing token in the auth payload")
        wanted = auth.get("consultation_id") if isinstance(auth, dict) else None
        self._verifying += 1
        try:
            identity = await self._authenticate(
                token, ConsultationId(wanted) if isinstance(wanted, str) else None
            )
            if identity.token_id in self._revoked_while_verifying:
                raise Refused("invite has been revoked")
        except (Refused, Unavailable) as exc:
            log.info("connection %s refused: %s", sid, exc)
            raise socketio.exceptions.ConnectionRefusedError(str(exc)) from None
        except Exception:
            # A bug, not the client's doing; the client still gets its answer.
            log.exception("verifying the token of %s failed", sid)
            raise socketio.exceptions.ConnectionRefusedError(
                "the server could not verify the token"
            ) from None
        finally:
            self._verifying -= 1
            if not self._verifying:
                self._revoked_while_verifying.clear()
        return identity

    async def recording_failed(self, consultation_id: ConsultationId, why: str) -> None:
        """This node's recorder of the room failed (see LiveRoomService.recording_failed)."""
        try:
            await self._apply(await self._rooms.recording_failed(consultation_id, why))
        except DomainError as exc:
            log.warning("the failed recording of %s was not stopped: %s", consultation_id, exc)

    async def end_token(self, token_id: str) -> None:
        """The token `token_id` was revoked: every connection of this node that presented it
        is told, its seat closes with reason `revoked`, and it is disconnected."""
        if self._verifying:
            self._revoked_while_verifying.add(token_id)
        ended = [
            sid
            for sid, c in self._connections.items()
            if c.identity.token_id == token_id and c.owner is None
        ]
        await asyncio.gather(*(self._end_revoked(sid) for sid in ended))

    def token_ids(self) -> set[str]:
        """The token ids this node's connections presented (invites, mostly)."""
        return {
            c.identity.token_id
            for c in self._connections.values()
            if c.identity.token_id and c.owner is None
        }

    async def _end_revoked(self, sid: str) -> None:
        conn = self._connections.get(sid)
        if conn is None:
            return
        async with conn.lock:
            if conn.revoked:
                return
            conn.revoked = True
            cid, conn.consultation_id = conn.consultation_id, None
            log.info("ending %s: its token was revoked", sid)
            await self.emit("token_revoked", {"message": "your token has been revoked"}, to=sid)
            if cid is not None:
                try:
                    await self._apply(await self._rooms.revoked(sid, cid))
                except DomainError as exc:
                    log.info("seat of %s in %s not closed: %s", sid, cid, exc)
                self._timers.start(self._watch_for_empty(cid))
            await self.disconnect(sid)

    async def _on_disconnect(self, sid: str) -> None:
        conn = self._connections.pop(sid, None)
        if conn is None:
            return
        conn.gone = True
        if conn.lock.locked():
            # One of its events (a join, say) is still running and may yet take a seat: the
            # seat is seen to, as dropped, once that event is done.
            self._timers.start(self._dropped_after_events(sid, conn))
            return
        await self._dropped(sid, conn)

    async def _dropped_after_events(self, sid: str, conn: Connection) -> None:
        async with conn.lock:
            await self._dropped(sid, conn)

    async def _dropped(self, sid: str, conn: Connection) -> None:
        if conn.owner is not None and self._routing is not None:
            await self._routing.link.tell(conn.owner, {"op": "detach", "sid": sid})
            return
        cid = conn.consultation_id
        if cid is None:
            return
        try:
            await self._seat_disconnected(sid, cid)
        except Unavailable:
            # The seat must not stay "connected" for a connection that is gone: try again
            # until presence is back.
            log.warning("disconnect of %s not yet recorded: presence is unavailable", sid)
            self._timers.start(self._seat_disconnected_later(sid, cid))

    async def _seat_disconnected(self, sid: str, cid: ConsultationId) -> None:
        seat = await self._rooms.disconnected(sid, cid)
        if seat is not None:
            participant, since = seat
            self._timers.start(self._expire_later(cid, participant, since))
            return
        # No seat (the room ended, perhaps on another node): its media here goes with it.
        for (room, held), holder in list(self._seats.items()):
            if holder == sid and room == cid:
                await self._apply_media(_unseated(cid, ParticipantId(held)))

    async def _seat_disconnected_later(self, sid: str, cid: ConsultationId) -> None:
        while True:
            await asyncio.sleep(UNAVAILABLE_RETRY_S)
            with contextlib.suppress(Unavailable):
                await self._seat_disconnected(sid, cid)
                return

    async def _expire_later(
        self, cid: ConsultationId, participant: ParticipantId, since: datetime
    ) -> None:
        await asyncio.sleep(self._config.reconnect_grace_s)
        await self._apply(await self._rooms.expire(cid, participant, since))
        await self._watch_for_empty(cid)

    async def _watch_for_empty(self, cid: ConsultationId) -> None:
        """When the last clinician has gone, give them a while to come back, then end. Only
        the newest watch of a room counts: an earlier one must not end the session early."""
        if await self._rooms.clinician_present(cid):
            return
        previous = self._empty_watch.pop(cid, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.ensure_future(self._end_if_still_empty(cid))
        self._empty_watch[cid] = task
        self._timers.track(task)

    async def _end_if_still_empty(self, cid: ConsultationId) -> None:
        await asyncio.sleep(self._config.empty_room_grace_s)
        self._empty_watch.pop(cid, None)
        try:
            await self._apply(await self._rooms.end_abandoned(cid))
        except DomainError as exc:
            log.info("session of %s not ended automatically: %s", cid, exc)

    # --- handlers ----------------------------------------------------------------------------

    async def _join(self, sid: str, conn: Connection, body: ev.Join) -> Outcome:
        if conn.consultation_id is not None:
            raise _refused("already_joined", "this connection is already in a consultation")
        cid = ConsultationId(body.consultation_id)
        if self._routing is not None:
            await self._take_over_once(cid)
        media = self._media

        def keep_media(participant: ParticipantId) -> bool:
            return media.media_alive(cid, participant)

        outcome = await self._rooms.join(
            sid, conn.actor, cid, body.device, keep_media if body.keep_media else None
        )
        conn.consultation_id = cid
        if conn.gone:
            # Dropped while joining: no audiences for a connection that is no more (the seat
            # is seen to as dropped once this is done, _on_disconnect).
            outcome.memberships = [m for m in outcome.memberships if m.connection != sid]
        return outcome

    async def _leave(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        cid = _room(conn)
        outcome = await self._rooms.leave(sid, cid)
        conn.consultation_id = None
        self._timers.start(self._watch_for_empty(cid))
        return outcome

    async def _admit(self, sid: str, conn: Connection, body: ev.Admit) -> Outcome:
        return await self._rooms.admit(
            sid, conn.actor, _room(conn), ParticipantId(body.participant)
        )

    async def _deny(self, sid: str, conn: Connection, body: ev.Deny) -> Outcome:
        return await self._rooms.deny(
            sid, conn.actor, _room(conn), ParticipantId(body.participant), body.reason
        )

    async def _chat(self, sid: str, conn: Connection, body: ev.Chat) -> Outcome:
        if len(body.text) > self._config.chat_max_chars:
            raise _refused(
                "chat_too_long",
                f"chat messages are limited to {self._config.chat_max_chars} characters",
            )
        return await self._rooms.chat(sid, conn.actor, _room(conn), body.text)

    async def _raise_hand(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        return await self._rooms.hand(sid, conn.actor, _room(conn), raised=True)

    async def _lower_hand(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        return await self._rooms.hand(sid, conn.actor, _room(conn), raised=False)

    async def _mute(self, sid: str, conn: Connection, body: ev.Mute) -> Outcome:
        return await self._rooms.mute(
            sid, conn.actor, _room(conn), ParticipantId(body.participant), body.kind
        )

    async def _remove(self, sid: str, conn: Connection, body: ev.Remove) -> Outcome:
        return await self._rooms.remove(
            sid, conn.actor, _room(conn), ParticipantId(body.participant), body.reason
        )

    async def _consent(self, sid: str, conn: Connection, body: ev.GiveConsent) -> Outcome:
        return await self._rooms.consent(
            sid, conn.actor, _room(conn), body.kind, body.granted, body.on_behalf_of
        )

    async def _annotate(self, sid: str, conn: Connection, body: ev.Annotate) -> Outcome:
        if len(body.points) > self._config.annotation_max_points:
            raise _refused(
                "too_many_points",
                f"a stroke has at most {self._config.annotation_max_points} points; split it",
            )
        stroke = Stroke(
            body.target_track,
            list(body.points),
            body.colour,
            body.width,
            body.clear,
            body.media_time,
        )
        return await self._rooms.annotate(sid, conn.actor, _room(conn), stroke)

    async def _pointer(self, sid: str, conn: Connection, body: ev.Pointer) -> Outcome:
        return await self._rooms.pointer(
            sid, conn.actor, _room(conn), body.target_track, body.x, body.y
        )

    async def _start_recording(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        return await self._rooms.start_recording(sid, conn.actor, _room(conn))

    async def _stop_recording(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        return await self._rooms.stop_recording(sid, conn.actor, _room(conn))

    async def _set_trainee_chat(self, sid: str, conn: Connection, body: ev.TraineeChat) -> Outcome:
        return await self._rooms.set_trainee_chat(sid, conn.actor, _room(conn), body.open)

    async def _publish_offer(self, sid: str, conn: Connection, body: ev.PublishOffer) -> Outcome:
        cid = _room(conn)
        sources = {mid: source.value for mid, source in body.tracks.items()}
        # Admitted, and a role that may publish something, before the SDP is even read.
        me = await self._rooms.check_publish(sid, conn.actor, cid, [])
        try:
            # Every section that would publish is named and of its source's kind; the
            # publisher may publish each of those sources; then the caps and the answer.
            wanted = self._media.offered_sources(body.sdp, sources)
            me = await self._rooms.check_publish(
                sid, conn.actor, cid, [TrackSource(s) for s in wanted.values()]
            )
            answer, added = await self._media.publish(cid, me.participant_id, body.sdp, sources)
        except MediaError as exc:
            raise RoomRefused(exc.code, str(exc)) from None
        if me.audio_muted:
            self._media.pause(cid, me.participant_id, "audio", paused=True)
        if me.video_muted:
            self._media.pause(cid, me.participant_id, "video", paused=True)
        if self._edge_media is not None and added:
            carried = dict((i.track_id, p) for i, p in self._media.publications(cid))
            for info in added:
                await self._edge_media.track_published(cid, info, carried[info.track_id])
        out = Outcome()
        out.announce("publish_answer", {"sdp": answer}, Target.connection(sid))
        for info in added:
            out.announce(
                "track_published",
                {**info.public(), "name": me.name, "role": me.role.value},
                Target.room(cid),
            )
        return out

    async def _subscribe_answer(
        self, sid: str, conn: Connection, body: ev.SubscribeAnswer
    ) -> Outcome:
        cid = _room(conn)
        me = await self._rooms.seated(sid, cid)
        await self._media.accept_answer(cid, me.participant_id, body.sdp)
        return Outcome()

    async def _restart_subscribe(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        cid = _room(conn)
        me = await self._rooms.check_subscribe(sid, conn.actor, cid)
        out = Outcome()
        out.reply = {"subscribe": await self._media.restart_subscribe(cid, me.participant_id)}
        return out

    async def _set_layer(self, sid: str, conn: Connection, body: ev.SetLayer) -> Outcome:
        cid = _room(conn)
        me = await self._rooms.seated(sid, cid)
        layer = None if body.layer == "auto" else Layer(body.layer)
        count = self._media.set_layer(cid, me.participant_id, body.track_id, layer)
        out = Outcome()
        out.reply = {"tracks": count}
        return out

    async def _end_session(self, sid: str, conn: Connection, _: ev.Empty) -> Outcome:
        return await self._rooms.end_session(sid, conn.actor, _room(conn))


def _room(conn: Connection) -> ConsultationId:
    assert conn.consultation_id is not None  # checked by the dispatcher (needs_room)
    return conn.consultation_id


def _unseated(consultation_id: ConsultationId, participant: ParticipantId) -> Outcome:
    out = Outcome()
    out.unseated.append((consultation_id, participant))
    return out


def _room_name(audience: Audience, consultation_id: str) -> str:
    return f"{audience.value}:{consultation_id}"


def _refused(code: str, message: str) -> DomainError:
    return RoomRefused(code, message)


def _encoded_size(data: Any) -> int:
    # Called after payload_problem: bounded depth, valid Unicode, finite numbers, no binary.
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def _describe(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"
        for err in exc.errors(include_url=False)[:5]
    ]
    return "invalid payload: " + "; ".join(parts)
