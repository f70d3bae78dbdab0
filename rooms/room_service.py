"""The live room: joining, the waiting room, presence, chat, hands, moderation, consent and
annotation. Each action is checked with the one policy, appended to the session's event log,
and only then returned as announcements for the transport to deliver."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from rooms import lifecycle
from rooms.clock import Clock, utc_now
from rooms.consultations import ACTION_PERMISSION, ConsultationService, RequestContext
from rooms.errors import Forbidden, IllegalTransition, NotFound, RoomRefused
from rooms.lifecycle import Action
from rooms.live import (
    LiveParticipant,
    ParticipantState,
    PresenceStore,
    RecordingOn,
    RoomState,
)
from rooms.model import (
    CloseReason,
    Consent,
    ConsentKind,
    Consultation,
    ConsultationId,
    ConsultationStatus,
    EventKind,
    ParticipantId,
    Participation,
    SessionEvent,
    SessionId,
    TrackSource,
)
from rooms.outcome import Audience, Outcome, Seat, Target
from rooms.policy import Actor, can, require
from rooms.recording_rules import (
    RECORDER_ID,
    consents_needed,
    missing_consent,
    recorder_participant,
)
from rooms.roles import CLINICIAN_ROLES, SOURCE_PERMISSION, Permission, Role
from rooms.store import NewEvent, RecordRepository, RecordStore, SeatRecord
from rooms.visibility import audience_of, project, teaching_consent_given

log = logging.getLogger(__name__)

# How long a room trusts its copy of the consultation (team, status) for permission checks.
CONSULTATION_TTL_S = 2.0


# A seated participant's ICE servers (what server/ configures, credentials minted for them).
IceServersFor = Callable[[ParticipantId], Sequence[Mapping[str, Any]]]


def no_ice_servers(_participant: ParticipantId) -> Sequence[Mapping[str, Any]]:
    return ()


class RoomRecorders(Protocol):
    """The server's recorders. The room drives them under its lock, deciding and carrying out
    in one step, so that what the log and the room are told is what the recorder did."""

    async def start(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        """Records the room from now on; raises if the recorder could not start."""

    async def stop(self, consultation_id: ConsultationId) -> None:
        """Writes nothing more from now on; the open segments are closed and hashed in the
        background (the record is updated when each is)."""

    def session_ended(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        """The session is over: its composite is made once its segments are closed."""

    def adopt(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        """This worker took the room over from a dead one: the session's composite is made
        here when it ends, from whatever either of them recorded."""


@dataclass(frozen=True)
class RoomLimits:
    max_participants: int = 100
    chat_history: int = 200


@dataclass(frozen=True)
class Stroke:
    """A telestration stroke over one video track, in coordinates normalised to 0..1."""

    target_track: str
    points: list[tuple[float, float]]
    colour: str
    width: float
    clear: bool
    media_time: float | None


class LiveRoomService:
    def __init__(
        self,
        store: RecordStore,
        consultations: ConsultationService,
        presence: PresenceStore,
        limits: RoomLimits = RoomLimits(),
        clock: Clock = utc_now,
        ice_servers: IceServersFor = no_ice_servers,
    ) -> None:
        """`ice_servers` gives the STUN/TURN servers (RTCIceServer dictionaries) a seated
        client gets in `joined`, for its own peer connections; asked at every seating, so
        short-lived credentials are fresh each time."""
        self._store = store
        self._consultations = consultations
        self._presence = presence
        self._limits = limits
        self._now = clock
        self._ice_servers = ice_servers
        self._monotonic = time.monotonic
        self._consultations_seen: dict[ConsultationId, tuple[Consultation, float]] = {}
        self._recorders: RoomRecorders | None = None
        consultations.watch(self._forget)

    def use_recorders(self, recorders: RoomRecorders) -> None:
        """Set by the app once its recorders (which follow the media) exist; without them the
        room does not record."""
        self._recorders = recorders

    @property
    def limits(self) -> RoomLimits:
        return self._limits

    # --- joining and leaving ---------------------------------------------------------------

    async def join(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        device: str,
        keep_media: Callable[[ParticipantId], bool] | None = None,
    ) -> Outcome:
        """`keep_media`, when the client still holds its seat's media connections (a new
        signaling connection from the same page): whether the seat's media connections can
        carry on. A resumed seat then keeps them instead of starting its media afresh."""
        consultation = await self._joinable(actor, consultation_id)
        async with self._presence.lock(consultation_id):
            room = await self._room_for_join(actor, consultation)
            if actor.user_id in room.removed_users:
                raise RoomRefused("removed", "you were removed from this session")
            out = Outcome()
            existing = room.by_device(actor.user_id, device)
            if existing is not None:
                if existing.disconnected_at is None:
                    # The same device again before its old connection was seen to drop (a
                    # reloaded page, a network switch): the new connection takes the seat.
                    out.disconnects.append(existing.connection)
                return await self._resume(conn, room, existing, actor, out, keep_media)
            if len(room.participants) >= self._limits.max_participants:
                raise RoomRefused(
                    "room_full", f"the room is full ({self._limits.max_participants} participants)"
                )
            participant = LiveParticipant(
                participant_id=ParticipantId(f"p_{uuid.uuid4().hex[:12]}"),
                user_id=actor.user_id,
                name=actor.name,
                role=actor.role,
                org=actor.org,
                device=device,
                connection=conn,
                state=ParticipantState.WAITING,
                joined_at=self._now(),
            )
            if can(actor, Permission.ADMIT, consultation):
                # Whoever may admit others needs no one to admit them: the seat and what its
                # snapshot reads, in one transaction.
                seated, record = await self._seat_directly(room, participant)
                await self._announce_seated(room, seated, consultation, out, record)
            else:
                await self._wait(room, participant, out)
            return out

    async def leave(self, conn: str, consultation_id: ConsultationId) -> Outcome:
        async with self._presence.lock(consultation_id):
            out = Outcome()
            room = await self._presence.get(consultation_id)
            participant = room.by_connection(conn) if room else None
            if room is None or participant is None:
                raise RoomRefused("not_in_room", "you are not in this room")
            await self._close(room, participant, CloseReason.LEFT, out)
            return out

    async def revoked(self, conn: str, consultation_id: ConsultationId) -> Outcome:
        """The token this connection presented was revoked: its seat, admitted or waiting,
        closes at once (no grace to come back; the token no longer connects)."""
        async with self._presence.lock(consultation_id):
            out = Outcome()
            room = await self._presence.get(consultation_id)
            participant = room.by_connection(conn) if room else None
            if room is not None and participant is not None:
                await self._close(room, participant, CloseReason.REVOKED, out)
            return out

    async def disconnected(
        self, conn: str, consultation_id: ConsultationId
    ) -> tuple[ParticipantId, datetime] | None:
        """The connection dropped: keep the seat for the grace period. Returns the seat and the
        moment it dropped (to hand to `expire`), or None if the connection held no seat."""
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            participant = room.by_connection(conn) if room else None
            if participant is None:
                return None
            at = self._now()
            await self._presence.put_participant(
                consultation_id, replace(participant, disconnected_at=at)
            )
            return participant.participant_id, at

    async def expire(
        self, consultation_id: ConsultationId, participant_id: ParticipantId, since: datetime
    ) -> Outcome:
        """The grace period is over: if the seat is still empty since `since`, it is lost."""
        async with self._presence.lock(consultation_id):
            out = Outcome()
            room = await self._presence.get(consultation_id)
            participant = room.participants.get(participant_id) if room else None
            if room is None or participant is None or participant.disconnected_at != since:
                return out
            await self._close(room, participant, CloseReason.NETWORK_LOST, out)
            return out

    async def clinician_present(self, consultation_id: ConsultationId) -> bool:
        room = await self._presence.get(consultation_id)
        return room is not None and any(
            p.role in CLINICIAN_ROLES and p.state is ParticipantState.ADMITTED
            for p in room.participants.values()
        )

    async def end_abandoned(self, consultation_id: ConsultationId) -> Outcome:
        """No clinician came back within the grace period: the server ends the session."""
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            if room is None or await self.clinician_present(consultation_id):
                return Outcome()
            return await self._end(None, room, "no clinician left")

    async def take_over(
        self, consultation_id: ConsultationId
    ) -> tuple[Outcome, list[tuple[ParticipantId, datetime]]]:
        """This worker now owns a room whose worker died (placement placed it here afresh),
        before the join that placed it is handled. Every seat presence still shows connected
        was a connection of the dead worker: it is marked disconnected now and returned with
        that moment, for the caller to `expire` after the reconnect grace as for any dropped
        connection (the same user and device get it back). A recording the room shows on lost
        its recorder: it goes on here, as new segments of the same recording (the log's
        `recording_started` stands); if the recorder cannot start, the recording stops as
        interrupted and the failed start is logged and announced."""
        async with self._presence.lock(consultation_id):
            out = Outcome()
            room = await self._presence.get(consultation_id)
            if room is None:
                return out, []
            at = self._now()
            dropped: list[tuple[ParticipantId, datetime]] = []
            for participant in list(room.participants.values()):
                if participant.disconnected_at is None:
                    gone = replace(participant, disconnected_at=at)
                    await self._presence.put_participant(consultation_id, gone)
                    room.participants[gone.participant_id] = gone
                    dropped.append((gone.participant_id, at))
            if self._recorders is not None:
                self._recorders.adopt(consultation_id, room.session_id)
            if room.recording is not None:
                await self._resume_recording(room, out)
            return out, dropped

    async def end_lost(
        self, consultation_id: ConsultationId, still_lost: Callable[[], Awaitable[bool]]
    ) -> SessionId | None:
        """The room's worker died and no live worker took the room over within the empty-room
        grace; `still_lost()`, asked under the room's lock, says whether that still holds (a
        join that places the room elsewhere takes it over under this lock, after this). The
        seats close as `server_lost`, a recording stops as interrupted (its recorder died with
        the worker) and the session ends as aborted, as a room everyone left would; this
        worker makes its composite. Returns the session so ended, or None. Nobody can be
        connected to such a room (a join would have placed it), so nothing is announced."""
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            if room is None or not await still_lost():
                return None
            out = Outcome()
            for participant in list(room.participants.values()):
                await self._close(room, participant, CloseReason.SERVER_LOST, out)
            if room.recording is not None:
                async with self._store.transaction() as tx:
                    stop = await self._log_stop(tx, room, None, "interrupted")
                await self._recording_stopped(room, stop, out)
            if self._recorders is not None:
                self._recorders.adopt(consultation_id, room.session_id)
            await self._end(None, room, "aborted")
            return room.session_id

    # --- the waiting room --------------------------------------------------------------------

    async def admit(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, target: ParticipantId
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            out = Outcome()
            consultation = await self._check(actor, Permission.ADMIT, consultation_id)
            async with self._store.transaction() as tx:
                waiting = self._waiting_target(room, target)
                await self._append(
                    tx,
                    room,
                    EventKind.ADMITTED,
                    me,
                    {"participant_id": target, "user_id": waiting.user_id},
                )
                seated = await self._seat(tx, room, waiting, admitted_by=me)
            await self._announce_seated(room, seated, consultation, out)
            out.announce(
                "admitted",
                {"participant": target, "by": me.participant_id},
                Target.admitters(consultation_id),
            )
            return out

    async def deny(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        target: ParticipantId,
        reason: str,
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            await self._check(actor, Permission.ADMIT, consultation_id)
            async with self._store.transaction() as tx:
                waiting = self._waiting_target(room, target)
                await self._append(
                    tx,
                    room,
                    EventKind.DENIED,
                    me,
                    {"participant_id": target, "user_id": waiting.user_id, "reason": reason},
                )
            await self._presence.drop_participant(consultation_id, target)
            out = Outcome()
            payload = {"participant": target, "by": me.participant_id, "reason": reason}
            out.announce("denied", payload, Target.connection(waiting.connection))
            out.announce("denied", payload, Target.admitters(consultation_id))
            out.disconnects.append(waiting.connection)
            return out

    # --- in the room -------------------------------------------------------------------------

    async def chat(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, text: str
    ) -> Outcome:
        room, me = await self._member(conn, consultation_id)
        if actor.role is Role.TRAINEE and not room.trainee_chat:
            raise RoomRefused("chat_closed", "chat is closed to trainees in this session")
        await self._check(actor, Permission.CHAT, consultation_id)
        event = await self._store.append_chat(
            NewEvent(
                room.session_id,
                self._now(),
                EventKind.CHAT,
                me.user_id,
                me.participant_id,
                {"text": text, "name": me.name, "role": me.role.value},
            )
        )
        out = Outcome()
        out.announce("chat_message", _chat_payload(event), Target.room(consultation_id))
        return out

    async def set_trainee_chat(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, open_: bool
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            await self._check(actor, Permission.ADMIT, consultation_id)
            async with self._store.transaction() as tx:
                await self._append(tx, room, EventKind.CHAT_SETTINGS, me, {"trainee_chat": open_})
            await self._presence.set_trainee_chat(consultation_id, open_)
        out = Outcome()
        out.announce(
            "trainee_chat_set",
            {"open": open_, "by": me.participant_id},
            Target.room(consultation_id),
        )
        return out

    async def hand(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, raised: bool
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            if me.hand_raised == raised:
                raise RoomRefused(
                    "no_change", f"your hand is already {'raised' if raised else 'down'}"
                )
            kind = EventKind.HAND_RAISED if raised else EventKind.HAND_LOWERED
            await self._check(actor, Permission.JOIN, consultation_id)
            async with self._store.transaction() as tx:
                await self._append(tx, room, kind, me, {})
            await self._presence.put_participant(consultation_id, replace(me, hand_raised=raised))
        out = Outcome()
        out.announce(kind.value, {"participant": me.participant_id}, Target.room(consultation_id))
        return out

    async def mute(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        target: ParticipantId,
        kind: str,
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            await self._check(actor, Permission.MUTE_OTHERS, consultation_id)
            async with self._store.transaction() as tx:
                other = self._admitted_target(room, target)
                await self._append(
                    tx, room, EventKind.MUTED, me, {"participant_id": target, "kind": kind}
                )
            muted = (
                replace(other, audio_muted=True)
                if kind == "audio"
                else replace(other, video_muted=True)
            )
            await self._presence.put_participant(consultation_id, muted)
        out = Outcome()
        out.muted.append((consultation_id, target, kind))
        out.announce(
            "muted",
            {"participant": target, "kind": kind, "by": me.participant_id},
            Target.room(consultation_id),
        )
        return out

    async def remove(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        target: ParticipantId,
        reason: str,
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            out = Outcome()
            await self._check(actor, Permission.REMOVE_PARTICIPANT, consultation_id)
            async with self._store.transaction() as tx:
                other = self._admitted_target(room, target)
                if other.user_id == me.user_id:
                    raise RoomRefused("invalid_target", "use leave to leave the room yourself")
                await self._append(
                    tx,
                    room,
                    EventKind.REMOVED,
                    me,
                    {"participant_id": target, "user_id": other.user_id, "reason": reason},
                )
            # A person is removed, with every device they are on.
            for seat in [p for p in room.participants.values() if p.user_id == other.user_id]:
                payload = {
                    "participant": seat.participant_id,
                    "by": me.participant_id,
                    "reason": reason,
                }
                out.announce("removed", payload, Target.connection(seat.connection))
                await self._close(
                    room, seat, CloseReason.KICKED, out, extra={"moderator_reason": reason}
                )
                out.announce("removed", payload, Target.room(consultation_id))
                out.disconnects.append(seat.connection)
            await self._presence.mark_removed(consultation_id, other.user_id)
            return out

    async def consent(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        kind: ConsentKind,
        granted: bool,
        on_behalf_of: str | None,
    ) -> Outcome:
        # Under the room's lock: a withdrawal may stop the recording.
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            consultation = await self._check(actor, Permission.CONSENT, consultation_id)
            async with self._store.transaction() as tx:
                subject = _consent_subject(actor, consultation, on_behalf_of)
                now = self._now()
                consent = Consent(
                    consultation_id, room.session_id, kind, granted, actor.user_id, subject, now
                )
                await tx.add_consent(consent)
                event = await self._append(
                    tx,
                    room,
                    EventKind.CONSENT,
                    me,
                    {"kind": kind.value, "granted": granted, "on_behalf_of": subject},
                )
                # Withdrawing consent stops the recording at once, in the same transaction.
                stops = (
                    not granted
                    and room.recording is not None
                    and kind in consents_needed(consultation)
                )
                stopped = await self._log_stop(tx, room, me, "consent_withdrawn") if stops else None
            out = Outcome()
            out.announce(
                "consent_recorded",
                {
                    "seq": event.seq,
                    "kind": kind.value,
                    "granted": granted,
                    "given_by": actor.user_id,
                    "on_behalf_of": subject,
                    "participant": me.participant_id,
                    "at": event.at.isoformat(),
                },
                Target.room(consultation_id),
            )
            if stopped is not None:
                await self._recording_stopped(room, stopped, out)
            return out

    async def annotate(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, stroke: Stroke
    ) -> Outcome:
        room, me = await self._member(conn, consultation_id)
        data: dict[str, Any] = {
            "target_track": stroke.target_track,
            "points": [list(p) for p in stroke.points],
            "colour": stroke.colour,
            "width": stroke.width,
            "clear": stroke.clear,
            "media_time": stroke.media_time,
        }
        await self._check(actor, Permission.ANNOTATE, consultation_id)
        async with self._store.transaction() as tx:
            event = await self._append(tx, room, EventKind.ANNOTATION, me, data)
        out = Outcome()
        out.announce(
            "annotation",
            {
                "seq": event.seq,
                "participant": me.participant_id,
                "at": event.at.isoformat(),
                **data,
            },
            Target.room(consultation_id),
        )
        return out

    async def pointer(
        self,
        conn: str,
        actor: Actor,
        consultation_id: ConsultationId,
        target_track: str,
        x: float,
        y: float,
    ) -> Outcome:
        """A moving pointer is not part of the record: checked, relayed, not stored."""
        _, me = await self._member(conn, consultation_id)
        await self._check(actor, Permission.ANNOTATE, consultation_id)
        out = Outcome()
        out.announce(
            "pointer",
            {"participant": me.participant_id, "target_track": target_track, "x": x, "y": y},
            Target.room(consultation_id),
            skip=conn,
        )
        return out

    async def check_publish(
        self, conn: str, actor: Actor, consultation_id: ConsultationId, sources: list[TrackSource]
    ) -> LiveParticipant:
        """Only admitted participants publish, and only the kinds of track their role may:
        each of `sources`, or with none, at least one kind (whoever may publish no kind of
        track has no publish connection at all)."""
        _, me = await self._member(conn, consultation_id)
        needed = sorted({SOURCE_PERMISSION[source.value] for source in sources})
        if not needed:
            consultation = await self._consultation(consultation_id)
            kinds = sorted(set(SOURCE_PERMISSION.values()))
            needed = [p for p in kinds if can(actor, p, consultation)][:1]
            if not needed:
                reason = can(actor, kinds[0], consultation).reason
                raise Forbidden(f"you may publish no kind of track ({reason})")
        for permission in needed:
            await self._check(actor, permission, consultation_id)
        return me

    async def seated(self, conn: str, consultation_id: ConsultationId) -> LiveParticipant:
        """The admitted participant on this connection, for media answers."""
        _, me = await self._member(conn, consultation_id)
        return me

    async def check_subscribe(
        self, conn: str, actor: Actor, consultation_id: ConsultationId
    ) -> LiveParticipant:
        """The admitted participant on this connection, if it may receive the room's media."""
        _, me = await self._member(conn, consultation_id)
        await self._check(actor, Permission.SUBSCRIBE, consultation_id)
        return me

    async def start_recording(
        self, conn: str, actor: Actor, consultation_id: ConsultationId
    ) -> Outcome:
        """The recorder starts under the room's lock, before the log says so; a start that
        fails is logged and announced as `recording_failed`, and nothing says recording."""
        recorders = self._recorders
        if recorders is None:
            raise RoomRefused("recording_unavailable", "this server does not record")
        out = Outcome()
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            consultation = await self._check(actor, Permission.START_RECORDING, consultation_id)
            if room.recording is not None:
                raise RoomRefused("already_recording", "the session is already being recorded")
            async with self._store.reading() as tx:
                # Consent changes only under this lock: it still holds when the log is written.
                missing = missing_consent(consultation, await tx.list_consents(consultation_id))
            if missing is not None:
                raise RoomRefused(
                    "consent_missing",
                    f"the resident has not given (or has withdrawn) the {missing.value} "
                    "consent this recording needs",
                )
            try:
                await recorders.start(consultation_id, room.session_id)
            except Exception as exc:
                log.exception("the recorder of %s did not start", consultation_id)
                why = f"the recorder could not start ({type(exc).__name__})"
                async with self._store.transaction() as tx:
                    failed = await self._append(
                        tx, room, EventKind.RECORDING_FAILED, me, {"reason": why}
                    )
                _announce_failed(room, failed, out)
                out.reply = {"recording": False, "reason": why}
                return out
            try:
                async with self._store.transaction() as tx:
                    event = await self._append(tx, room, EventKind.RECORDING_STARTED, me, {})
            except BaseException:
                # Nothing records that the log does not show.
                await recorders.stop(consultation_id)
                raise
            recording = RecordingOn(me.participant_id, event.at)
            await self._presence.set_recording(consultation_id, recording)
        out.reply = {"recording": True}
        out.announce(
            "participant_joined", recorder_participant(recording), Target.room(room.consultation_id)
        )
        out.announce(
            "recording_started",
            {"seq": event.seq, "by": me.participant_id, "at": event.at.isoformat()},
            Target.room(consultation_id),
        )
        return out

    async def stop_recording(
        self, conn: str, actor: Actor, consultation_id: ConsultationId
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, me = await self._member(conn, consultation_id)
            await self._check(actor, Permission.START_RECORDING, consultation_id)
            if room.recording is None:
                raise RoomRefused("not_recording", "the session is not being recorded")
            out = Outcome()
            await self._stop_recording(room, me, "stopped", out)
            return out

    async def recording_failed(self, consultation_id: ConsultationId, why: str) -> Outcome:
        """The recorder could not go on (`why`: `disk_full`, `write_failed`): the recording
        stops as if stopped in the room, the log and everyone are told why; the room goes on."""
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            out = Outcome()
            if room is not None and room.recording is not None:
                await self._stop_recording(room, None, why, out)
            return out

    async def transition(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        action: Action,
        *,
        reason: str | None = None,
        scheduled_time: datetime | None = None,
    ) -> tuple[Consultation, Outcome]:
        """A life-cycle action from the API. One that ends the open session (an abort while
        live) ends it through its room, as `end_session` does: the recording stops, everyone
        is told why and disconnected, the composite follows."""
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            out = Outcome()
            if room is not None:
                # Checked before anything stops: the same checks the service makes.
                current = await self._consultations.authorize(
                    ctx, consultation_id, ACTION_PERMISSION[action]
                )
                after = lifecycle.next_status(current.status, action, reason)
                if after is ConsultationStatus.LIVE:
                    room = None
            if room is not None and room.recording is not None:
                by = next(
                    (p for p in room.participants.values() if p.user_id == ctx.actor.user_id),
                    None,
                )
                await self._stop_recording(room, by, "session_ended", out)
            consultation = await self._consultations.transition(
                ctx, consultation_id, action, reason=reason, scheduled_time=scheduled_time
            )
            if room is not None:
                # The reason is the state the consultation went to (`aborted`).
                why = {"reason": consultation.status.value, "detail": reason}
                await self._close_room(room, why, out)
            return consultation, out

    async def end_session(
        self, conn: str, actor: Actor, consultation_id: ConsultationId
    ) -> Outcome:
        async with self._presence.lock(consultation_id):
            room, _ = await self._member(conn, consultation_id)
            return await self._end(actor, room, "ended")

    # --- helpers -----------------------------------------------------------------------------

    async def _stop_recording(
        self, room: RoomState, by: LiveParticipant | None, reason: str, out: Outcome
    ) -> None:
        """Records that the recording stopped and why, stops the recorder and tells the room
        (under its lock)."""
        async with self._store.transaction() as tx:
            event = await self._log_stop(tx, room, by, reason)
        await self._recording_stopped(room, event, out)

    async def _log_stop(
        self, tx: RecordRepository, room: RoomState, by: LiveParticipant | None, reason: str
    ) -> SessionEvent:
        return await tx.append_event(
            room.session_id,
            self._now(),
            EventKind.RECORDING_STOPPED,
            by.user_id if by else None,
            by.participant_id if by else None,
            {"reason": reason},
        )

    async def _recording_stopped(self, room: RoomState, event: SessionEvent, out: Outcome) -> None:
        """The stop is in the log: the recorder writes nothing more (its segments are hashed
        in the background), presence and the room hear of it."""
        cid = room.consultation_id
        if self._recorders is not None:
            await self._recorders.stop(cid)
        await self._presence.set_recording(cid, None)
        room.recording = None
        out.announce(
            "recording_stopped",
            {
                "seq": event.seq,
                "reason": event.data["reason"],
                "by": event.participant_id,
                "at": event.at.isoformat(),
            },
            Target.room(cid),
        )
        out.announce(
            "participant_left", {"participant": RECORDER_ID, "reason": "left"}, Target.room(cid)
        )

    async def _resume_recording(self, room: RoomState, out: Outcome) -> None:
        """Under the room's lock, the room's recorder having died with its worker: recording
        goes on here (a new recorder, new segment files, the same session clock)."""
        cid = room.consultation_id
        why = "this server does not record"
        if self._recorders is not None:
            try:
                await self._recorders.start(cid, room.session_id)
                return
            except Exception as exc:
                log.exception("the recorder of %s did not start again", cid)
                why = f"the recorder could not start again ({type(exc).__name__})"
        # The log shows recording since its start: it says the recording stopped, and why.
        async with self._store.transaction() as tx:
            stop = await self._log_stop(tx, room, None, "interrupted")
            failed = await self._append(tx, room, EventKind.RECORDING_FAILED, None, {"reason": why})
        await self._recording_stopped(room, stop, out)
        _announce_failed(room, failed, out)

    async def _room_for_join(self, actor: Actor, consultation: Consultation) -> RoomState:
        """The presence of the consultation's open session, opening one if a clinician comes
        to a scheduled consultation."""
        room = await self._presence.get(consultation.id)
        if room is not None and consultation.status is ConsultationStatus.LIVE:
            return room  # the common case: the session is open and people are in it
        session = await self._consultations.open_session(consultation.id)
        if session is None:
            if consultation.status is not ConsultationStatus.SCHEDULED:
                raise RoomRefused(
                    "not_joinable",
                    f"the consultation is {consultation.status.value}; "
                    "only scheduled or live consultations can be joined",
                )
            if actor.role not in CLINICIAN_ROLES:
                raise RoomRefused(
                    "session_not_started", "the session has not started; a clinician opens it"
                )
            try:
                session = await self._consultations.start_session(
                    RequestContext(actor), consultation.id
                )
                self._forget(consultation.id)
            except IllegalTransition:
                # Another node opened it first.
                session = await self._consultations.open_session(consultation.id)
                if session is None:
                    raise
        if room is None or room.session_id != session.id:
            room = RoomState(consultation.id, session.id)
            await self._presence.create(room)
        return room

    async def _seat(
        self,
        tx: RecordRepository,
        room: RoomState,
        participant: LiveParticipant,
        admitted_by: LiveParticipant | None,
    ) -> LiveParticipant:
        """Records a participant taking a seat in the session (inside the caller's transaction)."""
        seated, participation, joined = self._seating(room, participant, admitted_by)
        await tx.add_participation(participation)
        await tx.append_event(
            joined.session_id,
            joined.at,
            joined.kind,
            joined.actor,
            joined.participant_id,
            joined.data,
        )
        return seated

    async def _seat_directly(
        self, room: RoomState, participant: LiveParticipant
    ) -> tuple[LiveParticipant, SeatRecord]:
        """A seat nobody admitted, with what its snapshot reads, in one transaction."""
        seated, participation, joined = self._seating(room, participant, None)
        record = await self._store.seat(participation, joined, self._limits.chat_history)
        return seated, record

    def _seating(
        self,
        room: RoomState,
        participant: LiveParticipant,
        admitted_by: LiveParticipant | None,
    ) -> tuple[LiveParticipant, Participation, NewEvent]:
        """What a seat writes: the participation and its `joined` event."""
        now = self._now()
        seated = replace(participant, state=ParticipantState.ADMITTED, joined_at=now)
        participation = Participation(
            room.session_id,
            seated.participant_id,
            seated.user_id,
            seated.name,
            seated.role,
            seated.device,
            now,
            None,
            None,
        )
        joined = NewEvent(
            room.session_id,
            self._now(),
            EventKind.JOINED,
            seated.user_id,
            seated.participant_id,
            {
                "name": seated.name,
                "role": seated.role.value,
                "org": seated.org,
                "device": seated.device,
                "admitted_by": admitted_by.participant_id if admitted_by else None,
            },
        )
        return seated, participation, joined

    async def _announce_seated(
        self,
        room: RoomState,
        seated: LiveParticipant,
        consultation: Consultation,
        out: Outcome,
        record: SeatRecord | None = None,
    ) -> None:
        await self._presence.put_participant(room.consultation_id, seated)
        room.participants[seated.participant_id] = seated
        cid = room.consultation_id
        may_subscribe = _may(seated, Permission.SUBSCRIBE, consultation)
        out.seated.append(
            Seat(
                cid,
                seated.participant_id,
                seated.connection,
                may_subscribe,
                _may_publish(seated, consultation),
            )
        )
        if may_subscribe:
            out.enter(seated.connection, Audience.ROOM, cid)
        if _may(seated, Permission.ADMIT, consultation):
            out.enter(seated.connection, Audience.ADMITTERS, cid)
        out.announce(
            "participant_joined", seated.public(), Target.room(cid), skip=seated.connection
        )
        out.announce(
            "joined",
            await self._snapshot(
                room, seated, consultation, read=(record.chat, record.consents) if record else None
            ),
            Target.connection(seated.connection),
        )

    async def _wait(self, room: RoomState, participant: LiveParticipant, out: Outcome) -> None:
        async with self._store.transaction() as tx:
            await self._append(
                tx,
                room,
                EventKind.WAITING,
                participant,
                {
                    "name": participant.name,
                    "role": participant.role.value,
                    "device": participant.device,
                },
            )
        await self._presence.put_participant(room.consultation_id, participant)
        payload = {"participant": participant.public(), "session_id": room.session_id}
        out.announce("waiting", payload, Target.admitters(room.consultation_id))
        out.announce("waiting", payload, Target.connection(participant.connection))

    async def _resume(
        self,
        conn: str,
        room: RoomState,
        seat: LiveParticipant,
        actor: Actor,
        out: Outcome,
        keep_media: Callable[[ParticipantId], bool] | None,
    ) -> Outcome:
        """Back within the grace period: the same seat, no waiting room again."""
        resumed = replace(seat, connection=conn, disconnected_at=None)
        await self._presence.put_participant(room.consultation_id, resumed)
        room.participants[resumed.participant_id] = resumed
        if resumed.state is ParticipantState.WAITING:
            payload = {"participant": resumed.public(), "session_id": room.session_id}
            out.announce("waiting", payload, Target.connection(conn))
            return out
        consultation = await self._joinable(actor, room.consultation_id)
        may_subscribe = _may(resumed, Permission.SUBSCRIBE, consultation)
        seat_now = Seat(
            room.consultation_id,
            resumed.participant_id,
            conn,
            may_subscribe,
            _may_publish(resumed, consultation),
        )
        media_kept = keep_media is not None and keep_media(resumed.participant_id)
        if media_kept:
            out.moved.append(seat_now)
        else:
            # A new connection: its media connections start afresh.
            out.unseated.append((room.consultation_id, resumed.participant_id))
            out.seated.append(seat_now)
        if may_subscribe:
            out.enter(conn, Audience.ROOM, room.consultation_id)
        if _may(resumed, Permission.ADMIT, consultation):
            out.enter(conn, Audience.ADMITTERS, room.consultation_id)
        out.announce(
            "joined",
            await self._snapshot(room, resumed, consultation, media_kept=media_kept),
            Target.connection(conn),
        )
        return out

    async def _close(
        self,
        room: RoomState,
        participant: LiveParticipant,
        reason: CloseReason,
        out: Outcome,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Records that a participant left and why, then tells the room."""
        now = self._now()
        async with self._store.transaction() as tx:
            if participant.state is ParticipantState.ADMITTED:
                await tx.close_participation(
                    room.session_id, participant.participant_id, now, reason
                )
            await self._append(
                tx, room, EventKind.LEFT, participant, {"reason": reason.value, **(extra or {})}
            )
        await self._presence.drop_participant(room.consultation_id, participant.participant_id)
        room.participants.pop(participant.participant_id, None)
        cid = room.consultation_id
        out.unseated.append((cid, participant.participant_id))
        out.leave(participant.connection, Audience.ROOM, cid)
        out.leave(participant.connection, Audience.ADMITTERS, cid)
        payload = {"participant": participant.participant_id, "reason": reason.value}
        target = (
            Target.room(cid)
            if participant.state is ParticipantState.ADMITTED
            else Target.admitters(cid)
        )
        out.announce("participant_left", payload, target)

    async def _end(self, actor: Actor | None, room: RoomState, reason: str) -> Outcome:
        out = Outcome()
        if room.recording is not None:
            by = next(
                (p for p in room.participants.values() if actor and p.user_id == actor.user_id),
                None,
            )
            await self._stop_recording(room, by, "session_ended", out)
        ctx = RequestContext(actor) if actor else None
        await self._consultations.end_session(ctx, room.consultation_id, room.session_id, reason)
        await self._close_room(room, {"reason": reason}, out)
        return out

    async def _close_room(self, room: RoomState, why: dict[str, Any], out: Outcome) -> None:
        """The session is over in the record: everyone is told `why` and disconnected, the
        room's media and presence go, the composite follows."""
        self._forget(room.consultation_id)
        out.ended.append(room.consultation_id)
        if self._recorders is not None:
            self._recorders.session_ended(room.consultation_id, room.session_id)
        payload = {"session_id": room.session_id, **why}
        # To every connection, waiting or seated, whichever audiences it is in.
        for p in room.participants.values():
            out.announce("session_ended", payload, Target.connection(p.connection))
        out.disconnects.extend(p.connection for p in room.participants.values())
        out.unseated.extend((room.consultation_id, p) for p in room.participants)
        await self._presence.close(room.consultation_id)

    async def _snapshot(
        self,
        room: RoomState,
        me: LiveParticipant,
        consultation: Consultation,
        *,
        media_kept: bool = False,
        read: tuple[list[SessionEvent], list[Consent]] | None = None,
    ) -> dict[str, Any]:
        """`read`: the session's newest chat and the consents, when the seat's transaction
        has just read them."""
        if read is not None:
            chat, consents = read
        else:
            async with self._store.reading() as tx:
                chat = await tx.list_session_events(
                    room.session_id, EventKind.CHAT, self._limits.chat_history
                )
                consents = await tx.list_consents(room.consultation_id)
        # Consultation fields come from the reader's view (rooms/visibility.py), like the API's.
        view = project(
            consultation, audience_of(me.role, teaching_consent_given(consultation, consents))
        )
        return {
            "session_id": room.session_id,
            "consultation_id": view.id,
            "kind": view.kind.value,
            "you": me.public(),
            "participants": [
                *(p.public() for p in room.admitted()),
                *([recorder_participant(room.recording)] if room.recording else []),
            ],
            "waiting": (
                [p.public() for p in room.waiting()]
                if _may(me, Permission.ADMIT, consultation)
                else []
            ),
            # Chat is clinical content: only for those who see and hear the consultation.
            "chat": (
                [_chat_payload(e) for e in chat]
                if _may(me, Permission.SUBSCRIBE, consultation)
                else []
            ),
            "consents": [
                {
                    "kind": c.kind.value,
                    "granted": c.granted,
                    "given_by": c.given_by,
                    "on_behalf_of": c.on_behalf_of,
                    "at": c.at.isoformat(),
                }
                for c in consents
            ],
            "trainee_chat": room.trainee_chat,
            "recording": room.recording.to_dict() if room.recording else None,
            "ice_servers": [dict(s) for s in self._ice_servers(me.participant_id)],
            "media_kept": media_kept,
        }

    async def _member(
        self, conn: str, consultation_id: ConsultationId
    ) -> tuple[RoomState, LiveParticipant]:
        room = await self._presence.get(consultation_id)
        me = room.by_connection(conn) if room else None
        if room is None or me is None or me.state is not ParticipantState.ADMITTED:
            raise RoomRefused("not_in_room", "join the room (and be admitted) first")
        return room, me

    @staticmethod
    def _waiting_target(room: RoomState, target: ParticipantId) -> LiveParticipant:
        found = room.participants.get(target)
        if found is None or found.state is not ParticipantState.WAITING:
            raise RoomRefused("no_such_participant", f"no participant {target} is waiting")
        return found

    @staticmethod
    def _admitted_target(room: RoomState, target: ParticipantId) -> LiveParticipant:
        found = room.participants.get(target)
        if found is None or found.state is not ParticipantState.ADMITTED:
            raise RoomRefused("no_such_participant", f"no participant {target} in this room")
        return found

    async def _check(
        self, actor: Actor, permission: Permission, consultation_id: ConsultationId
    ) -> Consultation:
        consultation = await self._consultation(consultation_id)
        require(actor, permission, consultation)
        if consultation.status is not ConsultationStatus.LIVE:
            # E.g. aborted over the API while people were still in the room.
            raise RoomRefused(
                "not_live", f"the consultation is {consultation.status.value}; the session is over"
            )
        return consultation

    async def _consultation(self, consultation_id: ConsultationId) -> Consultation:
        """The consultation as the policy needs it, read at most every CONSULTATION_TTL_S:
        a chat message need not re-read the team. Changes made through this node's service
        drop the copy at once; changes made on another node reach the room within the TTL."""
        now = self._monotonic()
        cached = self._consultations_seen.get(consultation_id)
        if cached is not None and now - cached[1] < CONSULTATION_TTL_S:
            return cached[0]
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id}")
        self._consultations_seen[consultation_id] = (consultation, now)
        return consultation

    async def _joinable(self, actor: Actor, consultation_id: ConsultationId) -> Consultation:
        """The consultation, if the actor may join it (the room's copy while it is live)."""
        consultation = await self._consultation(consultation_id)
        if consultation.status is not ConsultationStatus.LIVE:
            # Opening or refusing a session goes by the stored state, not a copy.
            self._forget(consultation_id)
            consultation = await self._consultation(consultation_id)
        require(actor, Permission.JOIN, consultation)
        return consultation

    def _forget(self, consultation_id: ConsultationId) -> None:
        self._consultations_seen.pop(consultation_id, None)

    async def _append(
        self,
        tx: RecordRepository,
        room: RoomState,
        kind: EventKind,
        who: LiveParticipant | None,
        data: dict[str, Any],
    ) -> SessionEvent:
        return await tx.append_event(
            room.session_id,
            self._now(),
            kind,
            who.user_id if who else None,
            who.participant_id if who else None,
            data,
        )


def _announce_failed(room: RoomState, event: SessionEvent, out: Outcome) -> None:
    out.announce(
        "recording_failed",
        {
            "seq": event.seq,
            "reason": event.data["reason"],
            "by": event.participant_id,
            "at": event.at.isoformat(),
        },
        Target.room(room.consultation_id),
    )


def _chat_payload(event: SessionEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": event.at.isoformat(),
        "participant": event.participant_id,
        "user_id": event.actor,
        "name": event.data.get("name"),
        "role": event.data.get("role"),
        "text": event.data["text"],
    }


def _may(participant: LiveParticipant, permission: Permission, consultation: Consultation) -> bool:
    # Seated participants are in this consultation, so their scope is it.
    actor = Actor(
        participant.user_id, participant.name, participant.role, participant.org, consultation.id
    )
    return bool(can(actor, permission, consultation))


def _may_publish(participant: LiveParticipant, consultation: Consultation) -> bool:
    return any(
        _may(participant, permission, consultation)
        for permission in set(SOURCE_PERMISSION.values())
    )


def _consent_subject(actor: Actor, consultation: Consultation, on_behalf_of: str | None) -> str:
    """Consent is always about the resident: given by them or by their guardian."""
    resident = consultation.resident.pseudonym
    if on_behalf_of not in (None, resident):
        raise RoomRefused(
            "invalid_consent", f"consent in this consultation is given for the resident {resident}"
        )
    if actor.role is Role.RESIDENT and actor.user_id != resident:
        raise RoomRefused("invalid_consent", "a resident consents only for themselves")
    return resident
