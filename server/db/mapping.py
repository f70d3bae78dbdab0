"""Conversions between table rows and the domain dataclasses of rooms.model.

Rows come back with plain strings for enums and ids; these helpers restore the typed values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import RowMapping

from rooms.model import (
    Attachment,
    AttachmentFormat,
    AttachmentId,
    AttachmentKind,
    AuditAction,
    AuditEntry,
    CloseReason,
    Consent,
    ConsentKind,
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    EventKind,
    FinalDecision,
    OpinionContent,
    OpinionVersion,
    ParticipantId,
    Participation,
    Recording,
    RecordingId,
    Resident,
    Session,
    SessionEvent,
    SessionId,
    Sex,
    Signature,
    TeamMember,
    UserId,
)
from rooms.retention import LegalHold
from rooms.roles import Role
from rooms.store import InviteCode, NewAuditEntry, StoredAttachment, StoredRecording

Values = dict[str, Any]


def consultation_values(c: Consultation) -> Values:
    return {
        "id": c.id,
        "kind": c.kind.value,
        "specialty": c.specialty,
        "resident_pseudonym": c.resident.pseudonym,
        "resident_name": c.resident.display_name,
        "resident_age": c.resident.age,
        "resident_sex": c.resident.sex.value,
        "inviting_institution": c.inviting_institution,
        "inviting_clinician": c.inviting_clinician,
        "reason": c.reason,
        "purpose": c.purpose,
        "case_summary": c.case_summary,
        "requested_specialty": c.requested_specialty,
        "requested_title": c.requested_title,
        "preferred_time": c.preferred_time,
        "scheduled_time": c.scheduled_time,
        "status": c.status.value,
        "status_reason": c.status_reason,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }


def consultation_from_row(row: RowMapping, team: Iterable[TeamMember]) -> Consultation:
    return Consultation(
        id=ConsultationId(row["id"]),
        kind=ConsultationKind(row["kind"]),
        specialty=row["specialty"],
        resident=Resident(
            pseudonym=row["resident_pseudonym"],
            display_name=row["resident_name"],
            age=row["resident_age"],
            sex=Sex(row["resident_sex"]),
        ),
        inviting_institution=row["inviting_institution"],
        inviting_clinician=UserId(row["inviting_clinician"]),
        reason=row["reason"],
        purpose=row["purpose"],
        case_summary=row["case_summary"],
        requested_specialty=row["requested_specialty"],
        requested_title=row["requested_title"],
        preferred_time=row["preferred_time"],
        scheduled_time=row["scheduled_time"],
        status=ConsultationStatus(row["status"]),
        status_reason=row["status_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        team=list(team),
    )


def team_member_values(consultation_id: ConsultationId, m: TeamMember) -> Values:
    return {
        "consultation_id": consultation_id,
        "user_id": m.user_id,
        "name": m.name,
        "role": m.role.value,
        "institution": m.institution,
        "added_at": m.added_at,
    }


def team_member_from_row(row: RowMapping) -> TeamMember:
    return TeamMember(
        user_id=UserId(row["user_id"]),
        name=row["name"],
        role=Role(row["role"]),
        institution=row["institution"],
        added_at=row["added_at"],
    )


def session_values(s: Session) -> Values:
    return {
        "id": s.id,
        "consultation_id": s.consultation_id,
        "number": s.number,
        "started_at": s.started_at,
        "ended_at": s.ended_at,
        "end_reason": s.end_reason,
    }


def session_from_row(row: RowMapping) -> Session:
    return Session(
        id=SessionId(row["id"]),
        consultation_id=ConsultationId(row["consultation_id"]),
        number=row["number"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
    )


def participation_values(p: Participation) -> Values:
    return {
        "session_id": p.session_id,
        "participant_id": p.participant_id,
        "user_id": p.user_id,
        "name": p.name,
        "role": p.role.value,
        "device": p.device,
        "joined_at": p.joined_at,
        "left_at": p.left_at,
        "close_reason": p.close_reason.value if p.close_reason is not None else None,
    }


def participation_from_row(row: RowMapping) -> Participation:
    reason = row["close_reason"]
    return Participation(
        session_id=SessionId(row["session_id"]),
        participant_id=ParticipantId(row["participant_id"]),
        user_id=UserId(row["user_id"]),
        name=row["name"],
        role=Role(row["role"]),
        device=row["device"],
        joined_at=row["joined_at"],
        left_at=row["left_at"],
        close_reason=CloseReason(reason) if reason is not None else None,
    )


def event_from_row(row: RowMapping) -> SessionEvent:
    actor = row["actor"]
    participant = row["participant_id"]
    return SessionEvent(
        session_id=SessionId(row["session_id"]),
        seq=row["id"],
        at=row["at"],
        kind=EventKind(row["kind"]),
        actor=UserId(actor) if actor is not None else None,
        participant_id=ParticipantId(participant) if participant is not None else None,
        data=row["data"],
    )


def consent_values(c: Consent) -> Values:
    return {
        "consultation_id": c.consultation_id,
        "session_id": c.session_id,
        "kind": c.kind.value,
        "granted": c.granted,
        "given_by": c.given_by,
        "on_behalf_of": c.on_behalf_of,
        "at": c.at,
    }


def consent_from_row(row: RowMapping) -> Consent:
    session_id = row["session_id"]
    return Consent(
        consultation_id=ConsultationId(row["consultation_id"]),
        session_id=SessionId(session_id) if session_id is not None else None,
        kind=ConsentKind(row["kind"]),
        granted=bool(row["granted"]),
        given_by=UserId(row["given_by"]),
        on_behalf_of=row["on_behalf_of"],
        at=row["at"],
    )


def opinion_values(v: OpinionVersion) -> Values:
    return {
        "consultation_id": v.consultation_id,
        "version": v.version,
        "findings": v.content.findings,
        "assessment": v.content.assessment,
        "recommendations": v.content.recommendations,
        "referral_advice": v.content.referral_advice,
        "author": v.author,
        "created_at": v.created_at,
        "amendment_reason": v.amendment_reason,
        "content_hash": v.content_hash,
    }


def opinion_from_row(row: RowMapping, signatures: Iterable[Signature]) -> OpinionVersion:
    return OpinionVersion(
        consultation_id=ConsultationId(row["consultation_id"]),
        version=row["version"],
        content=OpinionContent(
            findings=row["findings"],
            assessment=row["assessment"],
            recommendations=row["recommendations"],
            referral_advice=row["referral_advice"],
        ),
        author=UserId(row["author"]),
        created_at=row["created_at"],
        amendment_reason=row["amendment_reason"],
        content_hash=row["content_hash"],
        signatures=tuple(signatures),
    )


def signature_values(consultation_id: ConsultationId, s: Signature) -> Values:
    return {
        "consultation_id": consultation_id,
        "version": s.version,
        "signer": s.signer,
        "signer_name": s.signer_name,
        "signer_role": s.signer_role.value,
        "signed_at": s.signed_at,
        "content_hash": s.content_hash,
        "key_id": s.key_id,
        "signature": s.value,
    }


def signature_from_row(row: RowMapping) -> Signature:
    return Signature(
        version=row["version"],
        signer=UserId(row["signer"]),
        signer_name=row["signer_name"],
        signer_role=Role(row["signer_role"]),
        signed_at=row["signed_at"],
        content_hash=row["content_hash"],
        key_id=row["key_id"],
        value=row["signature"],
    )


def decision_values(d: FinalDecision) -> Values:
    return {
        "consultation_id": d.consultation_id,
        "decided_by": d.decided_by,
        "decision": d.decision,
        "at": d.at,
    }


def decision_from_row(row: RowMapping) -> FinalDecision:
    return FinalDecision(
        consultation_id=ConsultationId(row["consultation_id"]),
        decided_by=UserId(row["decided_by"]),
        decision=row["decision"],
        at=row["at"],
    )


def recording_values(r: Recording) -> Values:
    return {
        "id": r.id,
        "session_id": r.session_id,
        "track": r.track,
        "kind": r.kind,
        "media_type": r.media_type,
        "sha256": r.sha256,
        "duration_s": r.duration_s,
        "size_bytes": r.size_bytes,
        "state": r.state,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
        "participant_id": r.participant_id,
        "name": r.name,
        "role": r.role,
        "source": r.source,
        "offset_s": r.offset_s,
        "progress": r.progress,
        "node": r.node,
    }


def recording_from_row(row: RowMapping) -> Recording:
    return Recording(
        id=RecordingId(row["id"]),
        session_id=SessionId(row["session_id"]),
        track=row["track"],
        kind=row["kind"],
        media_type=row["media_type"],
        sha256=row["sha256"],
        duration_s=row["duration_s"],
        size_bytes=row["size_bytes"],
        state=row["state"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        participant_id=row["participant_id"],
        name=row["name"],
        role=row["role"],
        source=row["source"],
        offset_s=row["offset_s"],
        progress=row["progress"],
        node=row["node"],
    )


def stored_recording_from_row(row: RowMapping) -> StoredRecording:
    """A row of `recordings` joined with its session's `consultation_id`."""
    return StoredRecording(
        recording_from_row(row), ConsultationId(row["consultation_id"]), row["path"]
    )


def attachment_values(a: Attachment, path: str) -> Values:
    return {
        "id": a.id,
        "consultation_id": a.consultation_id,
        "session_id": a.session_id,
        "kind": a.kind.value,
        "media_type": a.format.value,
        "size_bytes": a.size_bytes,
        "sha256": a.sha256,
        "path": path,
        "filename": a.filename,
        "description": a.description,
        "added_by": a.added_by,
        "added_by_name": a.added_by_name,
        "added_by_role": a.added_by_role.value,
        "added_at": a.added_at,
        "taken_at": a.taken_at,
        "track": a.track,
    }


def attachment_from_row(row: RowMapping) -> Attachment:
    session_id = row["session_id"]
    return Attachment(
        id=AttachmentId(row["id"]),
        consultation_id=ConsultationId(row["consultation_id"]),
        session_id=SessionId(session_id) if session_id is not None else None,
        kind=AttachmentKind(row["kind"]),
        format=AttachmentFormat(row["media_type"]),
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        filename=row["filename"],
        description=row["description"],
        added_by=UserId(row["added_by"]),
        added_by_name=row["added_by_name"],
        added_by_role=Role(row["added_by_role"]),
        added_at=row["added_at"],
        taken_at=row["taken_at"],
        track=row["track"],
    )


def stored_attachment_from_row(row: RowMapping) -> StoredAttachment:
    return StoredAttachment(attachment_from_row(row), row["path"])


def audit_values(e: NewAuditEntry) -> Values:
    return {
        "at": e.at,
        "actor": e.actor,
        "actor_role": e.actor_role.value,
        "action": e.action.value,
        "consultation_id": e.consultation_id,
        "target": e.target,
        "remote_addr": e.remote_addr,
        "detail": e.detail,
    }


def audit_from_row(row: RowMapping) -> AuditEntry:
    consultation_id = row["consultation_id"]
    return AuditEntry(
        seq=row["id"],
        at=row["at"],
        actor=UserId(row["actor"]),
        actor_role=Role(row["actor_role"]),
        action=AuditAction(row["action"]),
        consultation_id=ConsultationId(consultation_id) if consultation_id is not None else None,
        target=row["target"],
        remote_addr=row["remote_addr"],
        detail=row["detail"],
    )


def legal_hold_values(h: LegalHold) -> Values:
    return {
        "consultation_id": h.consultation_id,
        "reason": h.reason,
        "placed_by": h.placed_by,
        "placed_at": h.placed_at,
    }


def legal_hold_from_row(row: RowMapping) -> LegalHold:
    return LegalHold(
        consultation_id=ConsultationId(row["consultation_id"]),
        reason=row["reason"],
        placed_by=UserId(row["placed_by"]),
        placed_at=row["placed_at"],
    )


def invite_code_row(c: InviteCode) -> Values:
    return {
        "code_hash": c.code_hash,
        "consultation_id": c.consultation_id,
        "jti": c.jti,
        "user_id": c.user_id,
        "name": c.name,
        "role": c.role.value,
        "org": c.org,
        "expires_at": c.expires_at,
        "created_at": c.created_at,
    }


def invite_code_from_row(row: RowMapping) -> InviteCode:
    return InviteCode(
        code_hash=row["code_hash"],
        consultation_id=ConsultationId(row["consultation_id"]),
        jti=row["jti"],
        user_id=UserId(row["user_id"]),
        name=row["name"],
        role=Role(row["role"]),
        org=row["org"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
    )
