"""The `/consult` socket.io namespace: authenticates connections, validates every event,
hands it to the live-room service and delivers what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import socketio
from pydantic import BaseModel, ValidationError

from media.hub import MediaError, MediaHub, TrackInfo
from media.layers import Layer
from media.peer import PeerConfig
from rooms.errors import DomainError, RoomRefused, Unavailable
from rooms.model import ConsultationId, ParticipantId, TrackSource
from rooms.outcome import Audience, Outcome, RecorderOrder, Target
from rooms.policy import Actor
from rooms.room_service import LiveRoomService, Stroke
from signaling import events as ev
from signaling.packets import Unreadable, event_problem, payload_problem
from signaling.ratelimit import TokenBucket

log = logging.getLogger(__name__)

NAMESPACE = "/consult"
# How often a disconnect that presence could not take (Redis away) is tried again.
UNAVAILABLE_RETRY_S = 1.0


@dataclass(frozen=True)
class Identity:
    """Who a connection is, as their verified token says, and until when."""

    actor: Actor
    expires_at: datetime
    # The token's `jti`: revoking it ends every connection that presented it.
    token_id: str | None = None


class Refused(Exception):
    """A connection refused at connect; the message is what the client sees."""


# Verifies a token (and, for a scoped token, the consultation the client asks for).
Authenticate = Callable[[str, ConsultationId | None], Awaitable[Identity]]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    events_per_second: float = 20.0
    event_burst: int = 40
    reconnect_grace_s: float = 30.0
    empty_room_grace_s: float = 120.0
    chat_max_chars: int = 2000
    annotation_max_points: int = 500


class Recorders(Protocol):
    """Carries out the room service's recording orders (the server's session recorders)."""

    async def carry_out(self, order: RecorderOrder) -> None: ...


@dataclass
class Connection:
    identity: Identity
    bucket: TokenBucket
    consultation_id: ConsultationId | None = None
    # socket.io runs each event in a task of its own; this keeps one connection's events in
    # the order they were sent (asyncio locks are fair).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set once the token is revoked, for events already queued behind the revocation.
    revoked: bool = False

    @property
    def actor(self) -> Actor:
        return self.identity.actor


@dataclass(frozen=True)
class EventSpec:
    model: type[BaseModel]
    handler: Callable[[str, Connection, Any], Awaitable[Outcome]]
    needs_room: bool = True


@dataclass
class _Timers:
    tasks: set[asyncio.Future[None]] = field(default_factory=set)

    def start(self, coro: Awaitable[None]) -> None:
        self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Future[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class ConsultNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    def __init__(
        self,
        rooms: LiveRoomService,
        authenticate: Authenticate,
        limits: Limits,
        peer_config: PeerConfig,
    ) -> None:
        super().__init__(NAMESPACE)
        self._rooms = rooms
        self._media = MediaHub(peer_config, self._send_subscribe_offer, self._send_layer)
        # Set by the app once its recorders (which follow this namespace's media) exist.
        self._recorders: Recorders | None = None
        # Which connection holds each seat, to deliver its subscribe offers.
        self._seats: dict[tuple[str, str], str] = {}
        self._authenticate = authenticate
        self._config = limits
        self._connections: dict[str, Connection] = {}
        # Connects whose token is being verified, and the tokens revoked meanwhile: a token
        # found valid just before its revocation must not connect just after it. Emptied
        # whenever no connect is in flight, so it stays as small as the overlap.
        self._verifying = 0
        self._revoked_while_verifying: set[str] = set()
        self._timers = _Timers()
        self._empty_watch: dict[ConsultationId, asyncio.Future[None]] = {}
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
        return len(self._connections)

    def holds(self, connection: str) -> bool:
        """Whether `connection` (a socket id) is one of this node's."""
        return connection in self._connections

    @property
    def media(self) -> MediaHub:
        return self._media

    def use_recorders(self, recorders: Recorders) -> None:
        self._recorders = recorders

    async def stop(self) -> None:
        await self._timers.cancel_all()
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
        async with conn.lock:
            try:
                return await self._dispatch(sid, conn, event, name, data)
            except Exception:
                # Nothing a client sends may take the namespace down.
                log.exception("event %r failed", name[:64])
                return await self._error(sid, name, "internal", "the server could not handle this")

    async def _dispatch(
        self, sid: str, conn: Connection, event: Any, name: str, data: Any
    ) -> dict[str, Any]:
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
        if spec.needs_room and conn.consultation_id is None:
            return await self._error(sid, name, "not_in_room", "join a consultation first")
        try:
            outcome = await spec.handler(sid, conn, body)
        except DomainError as exc:
            return await self._error(sid, name, exc.code, str(exc))
        except MediaError as exc:
            return await self._error(sid, name, "media_error", str(exc))
        await self._apply(outcome)
        return {"ok": True, **({"result": outcome.reply} if outcome.reply else {})}

    async def _error(self, sid: str, event: str, code: str, message: str) -> dict[str, Any]:
        if code != "rate_limited":  # a flood would flood the log too
            # The client's event name as a repr: quoted, control characters escaped.
            log.info("refused %r from %s: %s", event[:64], sid, code)
        error = {"code": code, "message": message, "event": event[:64]}
        await self.emit("error", error, to=sid)
        return {"ok": False, "error": error}

    async def _apply(self, outcome: Outcome) -> None:
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
        if outcome.disconnects:
            # In a task of its own, so the ack of the event that caused it goes out first.
            self._timers.start(self._disconnect(outcome.disconnects))

    async def _apply_media(self, outcome: Outcome) -> None:
        """Media follows seats: a seat gone takes its tracks with it, a new seat receives the
        room's tracks, a forced mute stops forwarding at once."""
        for cid, participant in outcome.unseated:
            self._seats.pop((cid, participant), None)
            for gone in await self._media.leave(cid, participant):
                await self.emit(
                    "track_unpublished", gone.public(), to=_room_name(Audience.ROOM, cid)
                )
        for seat in outcome.seated:
            self._seats[(seat.consultation_id, seat.participant_id)] = seat.connection
            await self._media.enter(seat.consultation_id, seat.participant_id, seat.may_subscribe)
        for seat in outcome.moved:
            # The same peer connections, reached over a new signaling connection: an offer
            # that went to the old one goes again (the client then restarts ICE on both).
            self._seats[(seat.consultation_id, seat.participant_id)] = seat.connection
            await self._media.resend_offer(seat.consultation_id, seat.participant_id)
        for cid, participant, kind in outcome.muted:
            if participant in self._media.members(cid):
                self._media.pause(cid, participant, kind, paused=True)
        if self._recorders is not None:
            for order in outcome.recorder:
                await self._recorders.carry_out(order)

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
            await self.disconnect(sid)

    # --- connection life cycle ---------------------------------------------------------------

    async def _on_connect(self, sid: str, auth: Any) -> bool:
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
        self._connections[sid] = Connection(
            identity, TokenBucket(self._config.events_per_second, self._config.event_burst)
        )
        return True

    async def end_token(self, token_id: str) -> None:
        """The token `token_id` was revoked: every connection of this node that presented it
        is told, its seat closes with reason `revoked`, and it is disconnected."""
        if self._verifying:
            self._revoked_while_verifying.add(token_id)
        ended = [sid for sid, c in self._connections.items() if c.identity.token_id == token_id]
        await asyncio.gather(*(self._end_revoked(sid) for sid in ended))

    def token_ids(self) -> set[str]:
        """The token ids this node's connections presented (invites, mostly)."""
        return {c.identity.token_id for c in self._connections.values() if c.identity.token_id}

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
        if conn is None or conn.consultation_id is None:
            return
        try:
            await self._seat_disconnected(sid, conn.consultation_id)
        except Unavailable:
            # The seat must not stay "connected" for a connection that is gone: try again
            # until presence is back.
            log.warning("disconnect of %s not yet recorded: presence is unavailable", sid)
            self._timers.start(self._seat_disconnected_later(sid, conn.consultation_id))

    async def _seat_disconnected(self, sid: str, cid: ConsultationId) -> None:
        seat = await self._rooms.disconnected(sid, cid)
        if seat is not None:
            participant, since = seat
            self._timers.start(self._expire_later(cid, participant, since))

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
        media = self._media

        def keep_media(participant: ParticipantId) -> bool:
            return media.media_alive(cid, participant)

        outcome = await self._rooms.join(
            sid, conn.actor, cid, body.device, keep_media if body.keep_media else None
        )
        conn.consultation_id = cid
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
        if self._recorders is None:
            raise RoomRefused("recording_unavailable", "this server does not record")
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
