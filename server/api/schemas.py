"""Request and response bodies. Requests forbid unknown fields so a typo is an error, not a
silently dropped value; responses are built from domain objects by the `from_*` helpers."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    StringConstraints,
    WithJsonSchema,
)

from rooms.model import (
    Attachment,
    AttachmentFormat,
    AttachmentKind,
    AuditEntry,
    Consent,
    ConsultationKind,
    ConsultationStatus,
    FinalDecision,
    OpinionVersion,
    Participation,
    Recording,
    Session,
    SessionEvent,
    SessionRecord,
    Sex,
    Signature,
    SignatureCheck,
    TeamMember,
)
from rooms.roles import Role
from rooms.text import reject_control_characters, reject_control_characters_or_line_breaks
from rooms.visibility import ConsultationView

_MAX_INT = 2**63 - 1
# A version number is stored in an INTEGER column.
_MAX_VERSION = 2**31 - 1

# Bodies are strict: a string is never read as a number or a time, a boolean never as a
# number (JSON has real numbers and booleans). Query parameters are strings by nature and are
# converted, see the query models.
_Clean = AfterValidator(reject_control_characters)
_OneLine = AfterValidator(reject_control_characters_or_line_breaks)


def _sent_at_most(limit: int) -> BeforeValidator:
    """The document's maxLength holds for the string as sent: without this, a string one
    character too long would pass when its first character is whitespace stripped below."""

    def check(value: object) -> object:
        if isinstance(value, str) and len(value) > limit:
            raise ValueError(f"should have at most {limit} characters")
        return value

    return BeforeValidator(check)


# One line: names, institutions, specialties, titles.
Text = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    _sent_at_most(200),
    _OneLine,
]
LongText = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, max_length=20_000),
    _sent_at_most(20_000),
    _Clean,
]
ReasonText = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=2000),
    _sent_at_most(2000),
    _Clean,
]
BigText = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000),
    _sent_at_most(20_000),
    _Clean,
]
Identifier = Annotated[
    StrictStr,
    # ASCII, as the pattern reads in the JSON Schema of the document (Python's \w is Unicode).
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@:-]+$"
    ),
    _sent_at_most(64),
]

# Clinical times: RFC 3339 strings with an offset, written with a year from 1900 to 2200 (a
# year 1 or 9999 would overflow on conversion to UTC or in arithmetic, and is no clinical time).
FIRST_YEAR, LAST_YEAR = 1900, 2200
_AFTER_YEAR = (
    r"-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}"  # -MM-DDTHH:MM:SS
    r"(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"  # .fraction, offset
)
_RFC3339 = re.compile(r"(?P<year>[0-9]{4})" + _AFTER_YEAR)
_RFC3339_SCHEMA = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^(?:19[0-9]{2}|2[01][0-9]{2}|2200)" + _AFTER_YEAR + "$",
    "description": f"RFC 3339 with an offset; the year from {FIRST_YEAR} to {LAST_YEAR}",
}


def _rfc3339(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("a datetime must be an RFC 3339 string, e.g. 2025-03-01T09:00:00+08:00")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(
            "a datetime must be RFC 3339 with a timezone offset, e.g. 2025-03-01T09:00:00+08:00"
        )
    if not FIRST_YEAR <= int(match["year"]) <= LAST_YEAR:
        raise ValueError(f"a datetime's year must be from {FIRST_YEAR} to {LAST_YEAR}")
    return value


ClinicalTime = Annotated[AwareDatetime, BeforeValidator(_rfc3339), WithJsonSchema(_RFC3339_SCHEMA)]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ---------------------------------------------------------------------------


class ResidentIn(RequestBody):
    pseudonym: Identifier = Field(
        description="Pseudonymous resident id; never a national id number"
    )
    display_name: Text
    age: StrictInt = Field(ge=0, le=130)
    sex: Sex


class TeamMemberIn(RequestBody):
    user_id: Identifier
    name: Text
    role: Role
    institution: Text


class CreateConsultation(RequestBody):
    kind: ConsultationKind = ConsultationKind.CONSULTATION
    specialty: Text
    resident: ResidentIn
    reason: ReasonText
    purpose: ReasonText
    case_summary: LongText = ""
    requested_specialty: Text
    requested_title: Text = Field(description="e.g. 主任医师 / chief physician")
    preferred_time: ClinicalTime | None = None
    team: list[TeamMemberIn] = Field(default_factory=list, max_length=50)


class NoBody(RequestBody):
    """Actions that take nothing but may be sent `{}`."""


class ReasonBody(RequestBody):
    reason: ReasonText


class ScheduleBody(RequestBody):
    scheduled_time: ClinicalTime


class InviteIn(RequestBody):
    role: Literal["resident", "guardian", "trainee"]
    name: Text | None = Field(default=None, description="Required for guardians and trainees")
    ttl_s: StrictInt | None = Field(
        default=None, gt=0, le=_MAX_INT, description="Capped at the configured invite TTL"
    )


class OpinionIn(RequestBody):
    findings: LongText
    assessment: LongText
    recommendations: LongText
    referral_advice: LongText = ""
    amendment_reason: ReasonText | None = None


class SignIn(RequestBody):
    version: StrictInt = Field(
        ge=1, le=_MAX_VERSION, description="The version the signer read; only the newest is signed"
    )


class DecisionIn(RequestBody):
    decision: BigText


class ConsultationQuery(RequestBody):
    status: ConsultationStatus | None = None
    role: Role | None = None
    institution: Text | None = None
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=_MAX_INT)


class AuditQuery(RequestBody):
    consultation: Identifier | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    after: int = Field(
        default=0, ge=0, le=_MAX_INT, description="Return entries with seq greater than this"
    )


# --- responses --------------------------------------------------------------------------


class ResidentOut(ResponseBody):
    # Null when the reader may not see it (named in the consultation's `hidden`).
    pseudonym: str | None
    display_name: str | None
    age: int | None
    sex: Sex | None


class TeamMemberOut(ResponseBody):
    user_id: str
    name: str
    role: Role
    institution: str
    added_at: datetime

    @classmethod
    def of(cls, m: TeamMember) -> TeamMemberOut:
        return cls(
            user_id=m.user_id,
            name=m.name,
            role=m.role,
            institution=m.institution,
            added_at=m.added_at,
        )


class ConsultationOut(ResponseBody):
    """A consultation as its reader may see it (rooms/visibility.py): a field they may not see
    is null and its path is listed in `hidden`; every other field is as stored."""

    id: str
    kind: ConsultationKind
    specialty: str | None
    status: ConsultationStatus
    status_reason: str | None
    resident: ResidentOut
    inviting_institution: str | None
    inviting_clinician: str | None
    reason: str | None
    purpose: str | None
    case_summary: str | None
    requested_specialty: str | None
    requested_title: str | None
    preferred_time: datetime | None
    scheduled_time: datetime | None
    created_at: datetime
    updated_at: datetime
    team: list[TeamMemberOut] | None
    hidden: list[str] = Field(
        description="Paths of the fields withheld from this reader (null above), sorted"
    )

    @classmethod
    def of(cls, c: ConsultationView) -> ConsultationOut:
        r = c.resident
        return cls(
            id=c.id,
            kind=c.kind,
            specialty=c.specialty,
            status=c.status,
            status_reason=c.status_reason,
            resident=ResidentOut(
                pseudonym=r.pseudonym, display_name=r.display_name, age=r.age, sex=r.sex
            ),
            inviting_institution=c.inviting_institution,
            inviting_clinician=c.inviting_clinician,
            reason=c.reason,
            purpose=c.purpose,
            case_summary=c.case_summary,
            requested_specialty=c.requested_specialty,
            requested_title=c.requested_title,
            preferred_time=c.preferred_time,
            scheduled_time=c.scheduled_time,
            created_at=c.created_at,
            updated_at=c.updated_at,
            team=None if c.team is None else [TeamMemberOut.of(m) for m in c.team],
            hidden=sorted(f.value for f in c.hidden),
        )


class ConsultationList(ResponseBody):
    items: list[ConsultationOut]


class InviteOut(ResponseBody):
    token: str
    jti: str
    user_id: str
    role: Role
    expires_at: datetime
    link: str = Field(description="The page the invitee opens; the token is in its fragment")
    qr_svg: str = Field(description="`link` as a QR code: an SVG document (segno)")
    short_code: str = Field(
        description="8 characters to read out, grouped like K7QM-2XRD; redeemed at "
        "/api/v1/invites/redeem until the invite expires or is revoked"
    )


class RedeemIn(RequestBody):
    code: StrictStr = Field(
        max_length=64, description="The short code; case, spaces and hyphens do not matter"
    )


class RedeemOut(ResponseBody):
    token: str
    link: str
    consultation_id: str
    role: Role
    expires_at: datetime


class SignatureOut(ResponseBody):
    signer: str
    signer_name: str
    signer_role: Role
    signed_at: datetime
    content_hash: str
    # Ed25519 over the signed form (docs/domain.md), base64, and the key's id; null for
    # signatures made before signatures were keyed.
    key_id: str | None
    signature: str | None
    # Verified on this read: valid, invalid, unknown_key or unsigned.
    verification: SignatureCheck

    @classmethod
    def of(cls, s: Signature) -> SignatureOut:
        if s.check is None:
            raise RuntimeError("an opinion signature left unverified on its way out")
        return cls(
            signer=s.signer,
            signer_name=s.signer_name,
            signer_role=s.signer_role,
            signed_at=s.signed_at,
            content_hash=s.content_hash,
            key_id=s.key_id,
            signature=s.value,
            verification=s.check,
        )


class OpinionOut(ResponseBody):
    version: int
    findings: str
    assessment: str
    recommendations: str
    referral_advice: str
    author: str
    created_at: datetime
    amendment_reason: str | None
    content_hash: str
    locked: bool
    signatures: list[SignatureOut]

    @classmethod
    def of(cls, v: OpinionVersion) -> OpinionOut:
        return cls(
            version=v.version,
            findings=v.content.findings,
            assessment=v.content.assessment,
            recommendations=v.content.recommendations,
            referral_advice=v.content.referral_advice,
            author=v.author,
            created_at=v.created_at,
            amendment_reason=v.amendment_reason,
            content_hash=v.content_hash,
            locked=v.locked,
            signatures=[SignatureOut.of(s) for s in v.signatures],
        )


class SignedOut(ResponseBody):
    opinion: OpinionOut
    consultation_status: ConsultationStatus


class DecisionOut(ResponseBody):
    decided_by: str
    decision: str
    at: datetime

    @classmethod
    def of(cls, d: FinalDecision) -> DecisionOut:
        return cls(decided_by=d.decided_by, decision=d.decision, at=d.at)


class SessionOut(ResponseBody):
    id: str
    number: int
    started_at: datetime
    ended_at: datetime | None
    # "ended", "no clinician left", or "aborted" (the server stopped during the session).
    end_reason: str | None

    @classmethod
    def of(cls, s: Session) -> SessionOut:
        return cls(
            id=s.id,
            number=s.number,
            started_at=s.started_at,
            ended_at=s.ended_at,
            end_reason=s.end_reason,
        )


class ParticipationOut(ResponseBody):
    session_id: str
    participant_id: str
    user_id: str
    name: str
    role: Role
    device: str
    joined_at: datetime
    left_at: datetime | None
    close_reason: str | None

    @classmethod
    def of(cls, p: Participation) -> ParticipationOut:
        return cls(
            session_id=p.session_id,
            participant_id=p.participant_id,
            user_id=p.user_id,
            name=p.name,
            role=p.role,
            device=p.device,
            joined_at=p.joined_at,
            left_at=p.left_at,
            close_reason=p.close_reason.value if p.close_reason else None,
        )


class EventOut(ResponseBody):
    seq: int
    session_id: str
    at: datetime
    kind: str
    actor: str | None
    participant_id: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, e: SessionEvent) -> EventOut:
        return cls(
            seq=e.seq,
            session_id=e.session_id,
            at=e.at,
            kind=e.kind.value,
            actor=e.actor,
            participant_id=e.participant_id,
            data=e.data,
        )


class ConsentOut(ResponseBody):
    session_id: str | None
    kind: str
    granted: bool
    given_by: str
    on_behalf_of: str
    at: datetime

    @classmethod
    def of(cls, c: Consent) -> ConsentOut:
        return cls(
            session_id=c.session_id,
            kind=c.kind.value,
            granted=c.granted,
            given_by=c.given_by,
            on_behalf_of=c.on_behalf_of,
            at=c.at,
        )


class RecordingOut(ResponseBody):
    id: str
    session_id: str
    track: str
    kind: str
    media_type: str
    sha256: str | None
    duration_s: float | None
    size_bytes: int | None
    state: str
    started_at: datetime
    ended_at: datetime | None
    participant_id: str | None
    name: str | None
    role: str | None
    source: str | None
    # Where the recording starts, in seconds from the session's start.
    offset_s: float | None
    # A composite's rendering, 0..1.
    progress: float | None

    @classmethod
    def of(cls, r: Recording) -> RecordingOut:
        return cls(
            id=r.id,
            session_id=r.session_id,
            track=r.track,
            kind=r.kind,
            media_type=r.media_type,
            sha256=r.sha256,
            duration_s=r.duration_s,
            size_bytes=r.size_bytes,
            state=r.state,
            started_at=r.started_at,
            ended_at=r.ended_at,
            participant_id=r.participant_id,
            name=r.name,
            role=r.role,
            source=r.source,
            offset_s=r.offset_s,
            progress=r.progress,
        )


class AuditEntryOut(ResponseBody):
    seq: int
    at: datetime
    actor: str
    actor_role: Role
    action: str
    consultation_id: str | None
    target: str | None
    remote_addr: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, a: AuditEntry) -> AuditEntryOut:
        return cls(
            seq=a.seq,
            at=a.at,
            actor=a.actor,
            actor_role=a.actor_role,
            action=a.action.value,
            consultation_id=a.consultation_id,
            target=a.target,
            remote_addr=a.remote_addr,
            detail=a.detail,
        )


class AuditList(ResponseBody):
    items: list[AuditEntryOut]


class AttachmentOut(ResponseBody):
    id: str
    consultation_id: str
    session_id: str | None
    kind: AttachmentKind
    media_type: AttachmentFormat
    size_bytes: int
    sha256: str = Field(description="SHA-256 of the file as uploaded (hex)")
    filename: str | None = Field(description="As the uploader named it; hidden from trainees")
    description: str | None
    added_by: str
    added_by_name: str
    added_by_role: str
    added_at: datetime
    taken_at: datetime | None
    track: str | None
    deidentified: bool = Field(
        default=False, description="Shown to a trainee: names and DICOM identifiers removed"
    )

    @classmethod
    def of(cls, a: Attachment, deidentified: bool = False) -> AttachmentOut:
        return cls(
            id=a.id,
            consultation_id=a.consultation_id,
            session_id=a.session_id,
            kind=a.kind,
            media_type=a.format,
            size_bytes=a.size_bytes,
            sha256=a.sha256,
            filename=a.filename,
            description=a.description,
            added_by=a.added_by,
            added_by_name=a.added_by_name,
            added_by_role=a.added_by_role.value,
            added_at=a.added_at,
            taken_at=a.taken_at,
            track=a.track,
            deidentified=deidentified,
        )


class RecordOut(ResponseBody):
    consultation: ConsultationOut
    sessions: list[SessionOut]
    participations: list[ParticipationOut]
    events: list[EventOut]
    consents: list[ConsentOut]
    opinions: list[OpinionOut]
    decisions: list[DecisionOut]
    recordings: list[RecordingOut]
    audit: list[AuditEntryOut]
    # Files in the record, oldest first (GET .../attachments/{id}/content for each file); each
    # one added during a session is also an `attachment_added` event on its timeline.
    attachments: list[AttachmentOut]

    @classmethod
    def of(cls, r: SessionRecord, consultation: ConsultationView) -> RecordOut:
        """`consultation` is r.consultation as the reader sees it."""
        return cls(
            consultation=ConsultationOut.of(consultation),
            sessions=[SessionOut.of(s) for s in r.sessions],
            participations=[ParticipationOut.of(p) for p in r.participations],
            events=[EventOut.of(e) for e in r.events],
            consents=[ConsentOut.of(c) for c in r.consents],
            opinions=[OpinionOut.of(v) for v in r.opinions],
            decisions=[DecisionOut.of(d) for d in r.decisions],
            recordings=[RecordingOut.of(x) for x in r.recordings],
            audit=[AuditEntryOut.of(a) for a in r.audit],
            attachments=[AttachmentOut.of(a) for a in r.attachments],
        )


class Health(ResponseBody):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
    # GET /healthz: the node id of the process that answered (with workers, `host:port/w1`).
    node: str | None = None


class ProblemField(ResponseBody):
    path: str
    message: str


class Problem(ResponseBody):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    # An extension member: a stable, machine-readable name of the error.
    code: str
    errors: list[ProblemField] | None = None
