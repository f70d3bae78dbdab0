"""Use cases on consultations. Each runs in one store transaction, checks the one policy,
changes state through the life cycle and writes its audit entry before it returns."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from rooms import lifecycle, opinion
from rooms.clock import Clock, utc_now
from rooms.errors import Conflict, Forbidden, InvalidInput, NotFound
from rooms.lifecycle import Action
from rooms.model import (
    AuditAction,
    AuditEntry,
    CloseReason,
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    EventKind,
    FinalDecision,
    OpinionContent,
    OpinionVersion,
    ParticipantId,
    RecordingId,
    Resident,
    Session,
    SessionEvent,
    SessionId,
    SessionRecord,
    TeamMember,
    UserId,
)
from rooms.policy import Actor, can, require, require_invite, require_team_addition
from rooms.retention import LegalHold
from rooms.roles import CLINICIAN_ROLES, PATIENT_ROLES, Permission, Role
from rooms.store import (
    ConsultationFilter,
    NewAuditEntry,
    RecordRepository,
    RecordStore,
    StoredRecording,
)
from rooms.visibility import (
    ConsultationView,
    audience_of,
    depends_on_consent,
    project,
    teaching_consent_given,
)

# Which permission each life-cycle action needs.
ACTION_PERMISSION: dict[Action, Permission] = {
    Action.ACCEPT: Permission.RESPOND_TO_REQUEST,
    Action.DECLINE: Permission.RESPOND_TO_REQUEST,
    Action.SCHEDULE: Permission.SCHEDULE,
    Action.CANCEL: Permission.MANAGE_CONSULTATION,
    Action.ABORT: Permission.MANAGE_CONSULTATION,
    Action.ARCHIVE: Permission.MANAGE_CONSULTATION,
}

INVITABLE_ROLES = frozenset({Role.RESIDENT, Role.GUARDIAN, Role.TRAINEE})
TEAM_ROLES = CLINICIAN_ROLES | {Role.COORDINATOR}


@dataclass(frozen=True)
class NewTeamMember:
    user_id: UserId
    name: str
    role: Role
    institution: str


@dataclass(frozen=True)
class NewConsultation:
    kind: ConsultationKind
    specialty: str
    resident: Resident
    reason: str
    purpose: str
    case_summary: str
    requested_specialty: str
    requested_title: str
    preferred_time: datetime | None
    team: list[NewTeamMember]


@dataclass(frozen=True)
class Invite:
    """What an invite token is minted from; the jti makes it revocable."""

    consultation_id: ConsultationId
    user_id: UserId
    name: str
    role: Role
    org: str
    jti: str
    expires_at: datetime


@dataclass(frozen=True)
class RequestContext:
    actor: Actor
    remote_addr: str | None = None


class ConsultationService:
    def __init__(
        self, store: RecordStore, signer: opinion.OpinionSigner, clock: Clock = utc_now
    ) -> None:
        self._store = store
        self._signer = signer
        self._now = clock
        self._watchers: list[Callable[[ConsultationId], None]] = []

    @property
    def store(self) -> RecordStore:
        """The record this service works on (for the use cases beside it: attachments)."""
        return self._store

    def watch(self, on_change: Callable[[ConsultationId], None]) -> None:
        """`on_change` hears of every committed change to a consultation's status or team (the
        live room keeps a copy of both)."""
        self._watchers.append(on_change)

    def _changed(self, consultation_id: ConsultationId) -> None:
        for on_change in self._watchers:
            on_change(consultation_id)

    async def create(self, ctx: RequestContext, new: NewConsultation) -> Consultation:
        actor = ctx.actor
        require(actor, Permission.REQUEST_CONSULTATION)
        now = self._now()
        resident = new.resident
        consultation = Consultation(
            id=ConsultationId(f"c_{uuid.uuid4().hex[:16]}"),
            kind=new.kind,
            specialty=new.specialty,
            resident=resident,
            inviting_institution=actor.org,
            inviting_clinician=actor.user_id,
            reason=new.reason,
            purpose=new.purpose,
            case_summary=new.case_summary,
            requested_specialty=new.requested_specialty,
            requested_title=new.requested_title,
            preferred_time=new.preferred_time,
            scheduled_time=None,
            status=ConsultationStatus.REQUESTED,
            status_reason=None,
            created_at=now,
            updated_at=now,
            team=[TeamMember(actor.user_id, actor.name, actor.role, actor.org, now)],
        )
        for m in new.team:
            if consultation.member(m.user_id) is not None:
                raise InvalidInput(f"team member {m.user_id} is listed twice")
            _check_team_role(m.role)
            # The same rule as adding to the team later: the requester is its first member.
            require_team_addition(actor, consultation, m.role, m.institution)
            consultation.team.append(TeamMember(m.user_id, m.name, m.role, m.institution, now))
        if consultation.member(UserId(resident.pseudonym)) is not None:
            raise InvalidInput(
                f"the resident's pseudonym {resident.pseudonym} is also a team member's user id"
            )
        consultation.team.append(
            TeamMember(
                UserId(resident.pseudonym), resident.display_name, Role.RESIDENT, actor.org, now
            )
        )
        async with self._store.transaction() as tx:
            await tx.add_consultation(consultation)
            # The initial team is the first team change: who is on it, in which role.
            await self._audit(
                tx,
                ctx,
                AuditAction.CREATE_CONSULTATION,
                consultation.id,
                detail={"team": [_team_entry(m) for m in consultation.team]},
            )
        return consultation

    async def get(self, ctx: RequestContext, consultation_id: ConsultationId) -> Consultation:
        async with self._store.transaction() as tx:
            consultation = await self._load(tx, ctx.actor, Permission.JOIN, consultation_id)
            await self._audit(tx, ctx, AuditAction.VIEW_CONSULTATION, consultation_id)
        return consultation

    async def authorize(
        self, ctx: RequestContext, consultation_id: ConsultationId, permission: Permission
    ) -> Consultation:
        """The consultation, if the caller may do `permission` in it; not audited (for
        operational reads such as media statistics, which hold no clinical content)."""
        async with self._store.reading() as tx:
            return await self._load(tx, ctx.actor, permission, consultation_id)

    async def list_visible(
        self, ctx: RequestContext, query: ConsultationFilter
    ) -> list[Consultation]:
        """Only what the caller may see: their teams, or their institution for coordinators."""
        actor = ctx.actor
        if actor.role is Role.COORDINATOR:
            # The store pages exactly what policy lets a coordinator see.
            query = replace(query, inviting_institution=actor.org)
        else:
            query = replace(query, member=actor.user_id)
        async with self._store.reading() as tx:
            found = await tx.list_consultations(query)
        return [c for c in found if can(actor, Permission.JOIN, c)]

    async def transition(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        action: Action,
        *,
        reason: str | None = None,
        scheduled_time: datetime | None = None,
    ) -> Consultation:
        if action not in ACTION_PERMISSION:
            raise InvalidInput(f"{action.value} is not a request action")
        if action is Action.SCHEDULE and scheduled_time is None:
            raise InvalidInput("schedule needs scheduled_time")
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, ACTION_PERMISSION[action], consultation_id, for_update=True
            )
            before = consultation.status
            consultation.status = lifecycle.next_status(before, action, reason)
            consultation.status_reason = reason
            if scheduled_time is not None:
                consultation.scheduled_time = scheduled_time
            consultation.updated_at = self._now()
            await tx.update_consultation_state(consultation)
            if before is ConsultationStatus.LIVE:
                # Aborting a live consultation ends its session in the record too.
                for session in await tx.list_sessions(consultation_id):
                    if session.ended_at is None:
                        await _close_session(
                            tx, session, ctx.actor.user_id, f"aborted: {reason}", self._now()
                        )
            await self._audit(
                tx,
                ctx,
                AuditAction.TRANSITION,
                consultation_id,
                detail={
                    "action": action.value,
                    "from": before.value,
                    "to": consultation.status.value,
                },
            )
        self._changed(consultation_id)
        return consultation

    async def add_member(
        self, ctx: RequestContext, consultation_id: ConsultationId, new: NewTeamMember
    ) -> Consultation:
        """Adds a clinician or coordinator as policy.may_add_to_team allows; audited with who
        added whom, in which role and institution."""
        _check_team_role(new.role)
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, Permission.JOIN, consultation_id, for_update=True
            )
            require_team_addition(ctx.actor, consultation, new.role, new.institution)
            if consultation.status in lifecycle.TERMINAL | {ConsultationStatus.SIGNED}:
                raise Conflict(f"the team of a {consultation.status.value} consultation is closed")
            if consultation.member(new.user_id) is not None:
                raise Conflict(f"{new.user_id} is already on the team")
            member = TeamMember(new.user_id, new.name, new.role, new.institution, self._now())
            await tx.add_team_member(consultation_id, member)
            consultation.team.append(member)
            await self._audit_team_addition(tx, ctx, consultation_id, member, via="team")
        self._changed(consultation_id)
        return consultation

    async def view(self, ctx: RequestContext, consultation: Consultation) -> ConsultationView:
        """`consultation` as the caller may see it (rooms/visibility.py)."""
        return (await self.views(ctx, [consultation]))[0]

    async def views(
        self, ctx: RequestContext, consultations: list[Consultation]
    ) -> list[ConsultationView]:
        """Each consultation as the caller may see it; the consents are read only for roles
        whose view depends on them (trainees)."""
        role = ctx.actor.role
        if not depends_on_consent(role):
            return [project(c, audience_of(role, teaching_consent=False)) for c in consultations]
        async with self._store.reading() as tx:
            consents = {c.id: await tx.list_consents(c.id) for c in consultations}
        return [
            project(c, audience_of(role, teaching_consent_given(c, consents[c.id])))
            for c in consultations
        ]

    async def prepare_invite(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        role: Role,
        name: str | None,
        ttl: timedelta,
    ) -> Invite:
        """An invite for the resident, a guardian or a trainee; the caller mints the token."""
        if role not in INVITABLE_ROLES:
            raise InvalidInput(f"invites are for {', '.join(sorted(INVITABLE_ROLES))}")
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, Permission.INVITE, consultation_id, for_update=True
            )
            if consultation.status in lifecycle.TERMINAL | {
                ConsultationStatus.CANCELLED,
                ConsultationStatus.DECLINED,
            }:
                raise Conflict(f"cannot invite to a {consultation.status.value} consultation")
            if role is Role.TRAINEE and consultation.kind is not ConsultationKind.TEACHING:
                raise InvalidInput("trainees are invited to teaching sessions only")
            require_invite(ctx.actor, consultation, role)
            now = self._now()
            if role is Role.RESIDENT:
                user_id, display = (
                    UserId(consultation.resident.pseudonym),
                    consultation.resident.display_name,
                )
            else:
                if not name:
                    raise InvalidInput(f"an invite for a {role.value} needs a name")
                user_id, display = UserId(f"{role.value[0]}_{secrets.token_hex(6)}"), name
            if role is Role.GUARDIAN:
                member = TeamMember(user_id, display, role, consultation.inviting_institution, now)
                await tx.add_team_member(consultation_id, member)
                await self._audit_team_addition(tx, ctx, consultation_id, member, via="invite")
            invite = Invite(
                consultation_id=consultation_id,
                user_id=user_id,
                name=display,
                role=role,
                org=consultation.inviting_institution,
                jti=uuid.uuid4().hex,
                expires_at=now + ttl,
            )
            await self._audit(
                tx,
                ctx,
                AuditAction.ISSUE_INVITE,
                consultation_id,
                target=invite.jti,
                detail={
                    "role": role.value,
                    "user": user_id,
                    "expires_at": invite.expires_at.isoformat(),
                },
            )
        return invite

    async def revoke_invite(
        self, ctx: RequestContext, consultation_id: ConsultationId, jti: str, max_ttl: timedelta
    ) -> None:
        async with self._store.transaction() as tx:
            await self._load(tx, ctx.actor, Permission.REVOKE_INVITE, consultation_id)
            issued = await tx.list_audit(consultation_id, 100_000, 0)
            if not any(e.action is AuditAction.ISSUE_INVITE and e.target == jti for e in issued):
                raise NotFound(f"no invite {jti} was issued for consultation {consultation_id}")
            now = self._now()
            # Kept until any token carrying this jti would have expired anyway.
            await tx.revoke_token(jti, now + max_ttl, now)
            await self._audit(tx, ctx, AuditAction.REVOKE_INVITE, consultation_id, target=jti)

    async def start_session(self, ctx: RequestContext, consultation_id: ConsultationId) -> Session:
        """The first clinician in a scheduled consultation opens its next session (goes live)."""
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, Permission.JOIN, consultation_id, for_update=True
            )
            if ctx.actor.role not in CLINICIAN_ROLES:
                raise Forbidden("a session is opened by a clinician")
            before = consultation.status
            consultation.status = lifecycle.next_status(before, Action.START_SESSION)
            now = self._now()
            consultation.updated_at = now
            number = len(await tx.list_sessions(consultation_id)) + 1
            session = Session(
                SessionId(f"s_{uuid.uuid4().hex[:16]}"), consultation_id, number, now, None
            )
            await tx.update_consultation_state(consultation)
            await tx.add_session(session)
            await tx.append_event(
                session.id,
                now,
                EventKind.SESSION_STARTED,
                ctx.actor.user_id,
                None,
                {"number": number},
            )
            await self._audit(
                tx,
                ctx,
                AuditAction.TRANSITION,
                consultation_id,
                target=session.id,
                detail={"action": Action.START_SESSION.value, "from": before.value, "to": "live"},
            )
        return session

    async def end_session(
        self,
        ctx: RequestContext | None,
        consultation_id: ConsultationId,
        session_id: SessionId,
        reason: str = "ended",
    ) -> Consultation:
        """Ends a live session and closes every open participation in it. Without a context it
        is the server ending a session that no clinician is left in."""
        async with self._store.transaction() as tx:
            if ctx is None:
                found = await tx.get_consultation(consultation_id, for_update=True)
                if found is None:
                    raise NotFound(f"no consultation {consultation_id}")
                consultation = found
            else:
                consultation = await self._load(
                    tx, ctx.actor, Permission.END_SESSION, consultation_id, for_update=True
                )
            session = next(
                (s for s in await tx.list_sessions(consultation_id) if s.id == session_id), None
            )
            if session is None:
                raise NotFound(f"no session {session_id} in consultation {consultation_id}")
            if session.ended_at is not None:
                raise Conflict(f"session {session_id} has already ended")
            consultation.status = lifecycle.next_status(consultation.status, Action.END_SESSION)
            newest = opinion.latest(await tx.list_opinion_versions(consultation_id))
            if newest is not None and opinion.fully_signed(consultation, newest):
                # Everyone signed during the call: nothing is pending any more.
                consultation.status = lifecycle.next_status(
                    consultation.status, Action.COMPLETE_SIGNING
                )
            now = self._now()
            consultation.updated_at = now
            await tx.update_consultation_state(consultation)
            await _close_session(tx, session, ctx.actor.user_id if ctx else None, reason, now)
            if ctx is not None:
                # A session the server ends on its own is in the session log only.
                await self._audit(
                    tx,
                    ctx,
                    AuditAction.TRANSITION,
                    consultation_id,
                    target=session_id,
                    detail={
                        "action": Action.END_SESSION.value,
                        "from": "live",
                        "to": consultation.status.value,
                    },
                )
        self._changed(consultation_id)
        return consultation

    async def close_seats_of_a_lost_server(self, session: Session) -> list[ParticipantId]:
        """After a crash: whoever the log still shows in the room, seated or waiting, went
        with the server's connections. Each gets a `left` entry (reason `server_lost`) and a
        closed participation, in one transaction; the session itself stays open for them to
        come back. Returns the participants so closed."""
        async with self._store.transaction() as tx:
            present: dict[ParticipantId, SessionEvent] = {}
            for event in await tx.list_events(session.consultation_id):
                if event.session_id != session.id or event.participant_id is None:
                    continue
                if event.kind in (EventKind.JOINED, EventKind.WAITING):
                    present[event.participant_id] = event
                elif event.kind in (EventKind.LEFT, EventKind.DENIED):
                    present.pop(event.participant_id, None)
            if not present:
                return []
            now = self._now()
            seated = {
                p.participant_id
                for p in await tx.list_participations(session.consultation_id)
                if p.session_id == session.id and p.left_at is None
            }
            for participant_id in present:
                if participant_id in seated:
                    await tx.close_participation(
                        session.id, participant_id, now, CloseReason.SERVER_LOST
                    )
                await tx.append_event(
                    session.id,
                    now,
                    EventKind.LEFT,
                    None,
                    participant_id,
                    {"reason": CloseReason.SERVER_LOST.value},
                )
        return list(present)

    async def open_session(self, consultation_id: ConsultationId) -> Session | None:
        async with self._store.reading() as tx:
            sessions = await tx.list_sessions(consultation_id)
        return next((s for s in sessions if s.ended_at is None), None)

    async def write_opinion(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        content: OpinionContent,
        amendment_reason: str | None,
    ) -> OpinionVersion:
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, Permission.WRITE_OPINION, consultation_id, for_update=True
            )
            _require_status(
                consultation,
                {
                    ConsultationStatus.LIVE,
                    ConsultationStatus.OPINION_PENDING,
                    ConsultationStatus.SIGNED,
                },
                "write an opinion",
            )
            versions = await tx.list_opinion_versions(consultation_id)
            newest = opinion.latest(versions)
            opinion.check_new_version(versions, amendment_reason)
            number = (newest.version if newest else 0) + 1
            version = OpinionVersion(
                consultation_id=consultation_id,
                version=number,
                content=content,
                author=ctx.actor.user_id,
                created_at=self._now(),
                amendment_reason=amendment_reason,
                content_hash=opinion.content_hash(consultation, number, content, amendment_reason),
            )
            await tx.add_opinion_version(version)
            await self._audit(
                tx, ctx, AuditAction.WRITE_OPINION, consultation_id, target=str(number)
            )
        return version

    async def sign_opinion(
        self, ctx: RequestContext, consultation_id: ConsultationId, version: int | None
    ) -> tuple[OpinionVersion, Consultation]:
        actor = ctx.actor
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, actor, Permission.SIGN_OPINION, consultation_id, for_update=True
            )
            versions = await tx.list_opinion_versions(consultation_id)
            newest = opinion.check_signature(opinion.latest(versions), actor.user_id, version)
            previous = next((v for v in versions if v.version == newest.version - 1), None)
            signature = opinion.sign(
                self._signer, newest, previous, actor.user_id, actor.name, actor.role, self._now()
            )
            await tx.add_signature(consultation_id, signature)
            with_signature = replace(newest, signatures=(*newest.signatures, signature))
            others = [v for v in versions if v.version != newest.version]
            signed = opinion.verified(self._signer, [*others, with_signature])[-1]
            await self._audit(
                tx,
                ctx,
                AuditAction.SIGN_OPINION,
                consultation_id,
                target=str(newest.version),
                detail={"content_hash": newest.content_hash, "key_id": signature.key_id},
            )
            if consultation.status is ConsultationStatus.OPINION_PENDING and opinion.fully_signed(
                consultation, signed
            ):
                consultation.status = lifecycle.next_status(
                    consultation.status, Action.COMPLETE_SIGNING
                )
                consultation.updated_at = self._now()
                await tx.update_consultation_state(consultation)
                await self._audit(
                    tx,
                    ctx,
                    AuditAction.TRANSITION,
                    consultation_id,
                    detail={
                        "action": Action.COMPLETE_SIGNING.value,
                        "from": "opinion_pending",
                        "to": "signed",
                    },
                )
        return signed, consultation

    async def record_decision(
        self, ctx: RequestContext, consultation_id: ConsultationId, decision: str
    ) -> FinalDecision:
        async with self._store.transaction() as tx:
            await self._load(
                tx, ctx.actor, Permission.RECORD_DECISION, consultation_id, for_update=True
            )
            versions = await tx.list_opinion_versions(consultation_id)
            if not any(v.locked for v in versions):
                raise Conflict("the final decision follows a signed opinion; none is signed yet")
            entry = FinalDecision(consultation_id, ctx.actor.user_id, decision, self._now())
            await tx.add_decision(entry)
            await self._audit(tx, ctx, AuditAction.RECORD_DECISION, consultation_id)
        return entry

    async def record(self, ctx: RequestContext, consultation_id: ConsultationId) -> SessionRecord:
        """The whole record, filtered by what the caller may see; the read itself is audited."""
        async with self._store.transaction() as tx:
            consultation = await self._load(tx, ctx.actor, Permission.VIEW_RECORD, consultation_id)
            await self._audit(tx, ctx, AuditAction.VIEW_RECORD, consultation_id)
            return await _filtered_record(tx, ctx.actor, consultation, self._signer)

    async def export_record(
        self, ctx: RequestContext, consultation_id: ConsultationId
    ) -> SessionRecord:
        """The record as record() filters it for the caller, for an export (FHIR): needs
        export_record and is audited as an export."""
        async with self._store.transaction() as tx:
            consultation = await self._load(
                tx, ctx.actor, Permission.EXPORT_RECORD, consultation_id
            )
            await self._audit(tx, ctx, AuditAction.EXPORT_RECORD, consultation_id)
            return await _filtered_record(tx, ctx.actor, consultation, self._signer)

    async def open_recording(
        self, ctx: RequestContext, recording_id: RecordingId, detail: dict[str, Any]
    ) -> StoredRecording:
        """A recording and its file's path, if the caller may download recordings of its
        consultation; every access is audited (with `detail`, e.g. the byte range)."""
        async with self._store.transaction() as tx:
            found = await tx.get_recording(recording_id)
            if found is None:
                raise NotFound(f"no recording {recording_id}")
            cid = found.consultation_id
            await self._load(tx, ctx.actor, Permission.DOWNLOAD_RECORDING, cid)
            await self._audit(
                tx, ctx, AuditAction.DOWNLOAD_RECORDING, cid, target=recording_id, detail=detail
            )
            return found

    async def audit_log(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId | None,
        limit: int,
        after_seq: int,
    ) -> list[AuditEntry]:
        require(ctx.actor, Permission.VIEW_AUDIT)
        async with self._store.transaction() as tx:
            entries = await tx.list_audit(consultation_id, limit, after_seq)
            await self._audit(
                tx, ctx, AuditAction.VIEW_AUDIT, consultation_id, detail={"after": after_seq}
            )
        return entries

    async def verify_record(self, ctx: RequestContext, consultation_id: ConsultationId) -> None:
        """May the caller have the consultation's record verified (an operator's right, like
        the audit log: verification shows hashes and positions, no clinical content)? The
        request is audited; NotFound for an unknown consultation."""
        require(ctx.actor, Permission.VIEW_AUDIT)
        async with self._store.transaction() as tx:
            await self._existing(tx, consultation_id)
            await self._audit(tx, ctx, AuditAction.VERIFY_RECORD, consultation_id)

    async def legal_hold(
        self, ctx: RequestContext, consultation_id: ConsultationId
    ) -> LegalHold | None:
        require(ctx.actor, Permission.MANAGE_RETENTION)
        async with self._store.reading() as tx:
            await self._existing(tx, consultation_id)
            return await tx.get_legal_hold(consultation_id)

    async def place_legal_hold(
        self, ctx: RequestContext, consultation_id: ConsultationId, reason: str
    ) -> LegalHold:
        """Puts the consultation on hold (or replaces the reason of the hold in force): nothing
        of its record is destroyed while it lasts. The consultation's row is locked so that a
        retention run deciding on it waits for this, and sees the hold."""
        require(ctx.actor, Permission.MANAGE_RETENTION)
        async with self._store.transaction() as tx:
            await self._existing(tx, consultation_id, for_update=True)
            now = self._now()
            current = await tx.get_legal_hold(consultation_id)
            if current is not None:
                await tx.release_legal_hold(
                    consultation_id, ctx.actor.user_id, now, f"replaced: {reason}"
                )
            hold = LegalHold(consultation_id, reason, ctx.actor.user_id, now)
            await tx.place_legal_hold(hold)
            detail: dict[str, Any] = {"reason": reason}
            if current is not None:
                detail["replaces"] = current.reason
            await self._audit(tx, ctx, AuditAction.PLACE_LEGAL_HOLD, consultation_id, detail=detail)
        return hold

    async def release_legal_hold(
        self, ctx: RequestContext, consultation_id: ConsultationId, reason: str
    ) -> LegalHold:
        """Ends the hold in force (Conflict if there is none); returns the hold that ended."""
        require(ctx.actor, Permission.MANAGE_RETENTION)
        async with self._store.transaction() as tx:
            await self._existing(tx, consultation_id, for_update=True)
            current = await tx.get_legal_hold(consultation_id)
            if current is None:
                raise Conflict(f"consultation {consultation_id} is not on legal hold")
            await tx.release_legal_hold(consultation_id, ctx.actor.user_id, self._now(), reason)
            await self._audit(
                tx,
                ctx,
                AuditAction.RELEASE_LEGAL_HOLD,
                consultation_id,
                detail={"reason": reason, "held_for": current.reason},
            )
        return current

    async def _existing(
        self, tx: RecordRepository, consultation_id: ConsultationId, *, for_update: bool = False
    ) -> Consultation:
        """For operators' rights (not on any team): the consultation, or NotFound."""
        consultation = await tx.get_consultation(consultation_id, for_update=for_update)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id}")
        return consultation

    async def _load(
        self,
        tx: RecordRepository,
        actor: Actor,
        permission: Permission,
        consultation_id: ConsultationId,
        *,
        for_update: bool = False,
    ) -> Consultation:
        consultation = await tx.get_consultation(consultation_id, for_update=for_update)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id}")
        require(actor, permission, consultation)
        return consultation

    async def _audit_team_addition(
        self,
        tx: RecordRepository,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        member: TeamMember,
        *,
        via: str,
    ) -> None:
        # The entry's actor and actor_role say who added; target and detail say whom, as what.
        await self._audit(
            tx,
            ctx,
            AuditAction.ADD_TEAM_MEMBER,
            consultation_id,
            target=member.user_id,
            detail={**_team_entry(member), "via": via},
        )

    async def _audit(
        self,
        tx: RecordRepository,
        ctx: RequestContext,
        action: AuditAction,
        consultation_id: ConsultationId | None,
        *,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await tx.append_audit(
            NewAuditEntry(
                at=self._now(),
                actor=ctx.actor.user_id,
                actor_role=ctx.actor.role,
                action=action,
                consultation_id=consultation_id,
                target=target,
                remote_addr=ctx.remote_addr,
                detail=detail or {},
            )
        )


async def _filtered_record(
    tx: RecordRepository, actor: Actor, consultation: Consultation, signer: opinion.OpinionSigner
) -> SessionRecord:
    """The whole record of `consultation` as `actor` may see it (record() and exports), every
    opinion signature verified."""
    consultation_id = consultation.id
    opinions = opinion.verified(signer, await tx.list_opinion_versions(consultation_id))
    if actor.role in PATIENT_ROLES:
        # Drafts are the physicians' working notes; the resident sees what was signed.
        opinions = [v for v in opinions if v.locked]
    # The patient (whose data it is) and the inviting clinician (who answers for it)
    # see who accessed the record.
    sees_audit = actor.role in PATIENT_ROLES or actor.user_id == consultation.inviting_clinician
    audit = await tx.list_audit(consultation_id, 10_000, 0) if sees_audit else []
    return SessionRecord(
        consultation=consultation,
        sessions=await tx.list_sessions(consultation_id),
        participations=await tx.list_participations(consultation_id),
        events=await tx.list_events(consultation_id),
        consents=await tx.list_consents(consultation_id),
        opinions=opinions,
        decisions=await tx.list_decisions(consultation_id),
        recordings=await tx.list_recordings(consultation_id),
        audit=audit,
        # Trainees never read the record (view_record), so nobody here sees them de-identified.
        attachments=await tx.list_attachments(consultation_id),
    )


def _require_status(
    consultation: Consultation, allowed: set[ConsultationStatus], what: str
) -> None:
    if consultation.status not in allowed:
        raise Conflict(f"cannot {what} while the consultation is {consultation.status.value}")


def _team_entry(member: TeamMember) -> dict[str, str]:
    """A team member as the audit log names them: no personal name (the operator reads it)."""
    return {"user": member.user_id, "role": member.role.value, "institution": member.institution}


def _check_team_role(role: Role) -> None:
    if role not in TEAM_ROLES:
        raise InvalidInput(f"a {role.value} joins through an invite, not as a team member")


async def _close_session(
    tx: RecordRepository, session: Session, by: UserId | None, reason: str, now: datetime
) -> None:
    """Ends a session in the record: its end time, every open participation, the log entry."""
    await tx.end_session(session.id, now, reason)
    for p in await tx.list_participations(session.consultation_id):
        if p.session_id == session.id and p.left_at is None:
            await tx.close_participation(
                session.id, p.participant_id, now, CloseReason.SESSION_ENDED
            )
    await tx.append_event(session.id, now, EventKind.SESSION_ENDED, by, None, {"reason": reason})
