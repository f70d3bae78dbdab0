"""Entities of the consultation record. Plain dataclasses with typed ids; no behaviour beyond
what needs nothing but the entity itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NewType

from rooms.roles import Role

ConsultationId = NewType("ConsultationId", str)
SessionId = NewType("SessionId", str)
UserId = NewType("UserId", str)
# One connection of one person: a surgeon with two cameras is two participants, one user.
ParticipantId = NewType("ParticipantId", str)
RecordingId = NewType("RecordingId", str)
AttachmentId = NewType("AttachmentId", str)


class ConsultationKind(StrEnum):
    CONSULTATION = "consultation"
    TELEMENTORING = "telementoring"
    TEACHING = "teaching"


class ConsultationStatus(StrEnum):
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    SCHEDULED = "scheduled"
    LIVE = "live"
    OPINION_PENDING = "opinion_pending"
    SIGNED = "signed"
    ARCHIVED = "archived"
    CANCELLED = "cancelled"
    ABORTED = "aborted"


class Sex(StrEnum):
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"
    UNKNOWN = "unknown"


class CloseReason(StrEnum):
    """Why a participant left a session."""

    LEFT = "left"
    KICKED = "kicked"
    NETWORK_LOST = "network_lost"
    DUPLICATE = "duplicate"
    SESSION_ENDED = "session_ended"
    DENIED = "denied"
    REVOKED = "revoked"
    # The server holding the room died; its seats were closed when a server started again.
    SERVER_LOST = "server_lost"


class TrackSource(StrEnum):
    """What a published track shows or carries."""

    CAMERA = "camera"
    MICROPHONE = "microphone"
    SCREEN = "screen"
    # A second camera on the operating field (telementoring).
    FIELD_CAMERA = "field_camera"


class ConsentKind(StrEnum):
    CONSULTATION = "consultation"
    RECORDING = "recording"
    TEACHING = "teaching"


class EventKind(StrEnum):
    """Kinds of entries in a session's append-only event log."""

    SESSION_STARTED = "session_started"
    SESSION_ENDED = "session_ended"
    JOINED = "joined"
    LEFT = "left"
    WAITING = "waiting"
    ADMITTED = "admitted"
    DENIED = "denied"
    CHAT = "chat"
    CHAT_SETTINGS = "chat_settings"
    HAND_RAISED = "hand_raised"
    HAND_LOWERED = "hand_lowered"
    MUTED = "muted"
    REMOVED = "removed"
    CONSENT = "consent"
    ANNOTATION = "annotation"
    RECORDING_STARTED = "recording_started"
    RECORDING_STOPPED = "recording_stopped"
    RECORDING_FAILED = "recording_failed"
    # A file added to the consultation while this session was live (its id, not its bytes).
    ATTACHMENT_ADDED = "attachment_added"


class AuditAction(StrEnum):
    VIEW_CONSULTATION = "view_consultation"
    VIEW_RECORD = "view_record"
    EXPORT_RECORD = "export_record"
    DOWNLOAD_RECORDING = "download_recording"
    VIEW_AUDIT = "view_audit"
    VERIFY_RECORD = "verify_record"
    CREATE_CONSULTATION = "create_consultation"
    TRANSITION = "transition"
    ADD_TEAM_MEMBER = "add_team_member"
    ISSUE_INVITE = "issue_invite"
    REVOKE_INVITE = "revoke_invite"
    WRITE_OPINION = "write_opinion"
    SIGN_OPINION = "sign_opinion"
    RECORD_DECISION = "record_decision"
    DESTROY = "destroy"
    PLACE_LEGAL_HOLD = "place_legal_hold"
    RELEASE_LEGAL_HOLD = "release_legal_hold"
    ADD_ATTACHMENT = "add_attachment"
    # The list or one attachment's metadata read; the file (or its rendering) downloaded.
    VIEW_ATTACHMENT = "view_attachment"
    DOWNLOAD_ATTACHMENT = "download_attachment"


@dataclass(frozen=True)
class Resident:
    """The subject of a consultation, by pseudonymous id: no national id number here."""

    pseudonym: str
    display_name: str
    age: int
    sex: Sex


@dataclass(frozen=True)
class TeamMember:
    user_id: UserId
    name: str
    role: Role
    institution: str
    added_at: datetime


@dataclass
class Consultation:
    id: ConsultationId
    kind: ConsultationKind
    specialty: str
    resident: Resident
    inviting_institution: str
    inviting_clinician: UserId
    reason: str
    purpose: str
    case_summary: str
    requested_specialty: str
    requested_title: str
    preferred_time: datetime | None
    scheduled_time: datetime | None
    status: ConsultationStatus
    status_reason: str | None
    created_at: datetime
    updated_at: datetime
    team: list[TeamMember] = field(default_factory=list)

    def member(self, user_id: UserId) -> TeamMember | None:
        return next((m for m in self.team if m.user_id == user_id), None)


@dataclass(frozen=True)
class Session:
    """One live call of a consultation; a follow-up call is a second session."""

    id: SessionId
    consultation_id: ConsultationId
    number: int
    started_at: datetime
    ended_at: datetime | None
    # Why it ended: "ended" (by a clinician), "no clinician left", "aborted" (the
    # server stopped during the session; set at restart).
    end_reason: str | None = None


@dataclass(frozen=True)
class Participation:
    session_id: SessionId
    participant_id: ParticipantId
    user_id: UserId
    name: str
    role: Role
    device: str
    joined_at: datetime
    left_at: datetime | None
    close_reason: CloseReason | None


@dataclass(frozen=True)
class SessionEvent:
    """One entry of a session's append-only log, stamped by the server."""

    session_id: SessionId
    seq: int
    at: datetime
    kind: EventKind
    actor: UserId | None
    participant_id: ParticipantId | None
    data: dict[str, Any]


@dataclass(frozen=True)
class Consent:
    consultation_id: ConsultationId
    session_id: SessionId | None
    kind: ConsentKind
    granted: bool
    given_by: UserId
    on_behalf_of: str
    at: datetime


@dataclass(frozen=True)
class OpinionContent:
    findings: str
    assessment: str
    recommendations: str
    referral_advice: str


class SignatureCheck(StrEnum):
    """What verifying a signature found (rooms/opinion.py, on every read)."""

    VALID = "valid"
    # The signed form does not match: the version, the signer, the time or an earlier version
    # changed since, or the signature itself.
    INVALID = "invalid"
    # Signed with a key the server no longer knows (not among the previous public keys).
    UNKNOWN_KEY = "unknown_key"
    # Made before signatures were keyed (migration 0005): only the content hash is there.
    UNSIGNED = "unsigned"


@dataclass(frozen=True)
class Signature:
    version: int
    signer: UserId
    signer_name: str
    signer_role: Role
    signed_at: datetime
    content_hash: str
    # The Ed25519 signature (base64) over rooms.opinion.signed_form, and the key's id.
    key_id: str | None = None
    value: str | None = None
    # Set when read: the result of verifying value (never stored).
    check: SignatureCheck | None = None


@dataclass(frozen=True)
class OpinionVersion:
    """One version of the opinion (会诊意见). Versions are never edited, only added."""

    consultation_id: ConsultationId
    version: int
    content: OpinionContent
    author: UserId
    created_at: datetime
    amendment_reason: str | None
    content_hash: str
    signatures: tuple[Signature, ...] = ()

    @property
    def locked(self) -> bool:
        return bool(self.signatures)


@dataclass(frozen=True)
class FinalDecision:
    consultation_id: ConsultationId
    decided_by: UserId
    decision: str
    at: datetime


class RecordingKind(StrEnum):
    TRACK = "track"  # one published track's forwarded packets, as they came
    COMPOSITE = "composite"  # the session rendered into one playable video


class RecordingState(StrEnum):
    RECORDING = "recording"  # being written
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"  # left open by a crash; closed and hashed at restart
    RENDERING = "rendering"  # a composite being made
    FAILED = "failed"  # a composite that could not be made


@dataclass(frozen=True)
class Recording:
    """A recorded file: one segment of one track, or a session's composite."""

    id: RecordingId
    session_id: SessionId
    track: str
    kind: str
    media_type: str
    sha256: str | None
    duration_s: float | None
    size_bytes: int | None
    state: str
    started_at: datetime
    ended_at: datetime | None
    # Whose track it is (the composite's labels) and where it starts on the session clock.
    participant_id: str | None = None
    name: str | None = None
    role: str | None = None
    source: str | None = None
    offset_s: float | None = None
    # How far a composite's rendering got (0..1).
    progress: float | None = None
    # Who writes (or renders) the file, for whoever recovers it after that one died: behind
    # Redis the worker's incarnation (server/placement.py), alone the config node_id.
    node: str | None = None


class AttachmentKind(StrEnum):
    DOCUMENT = "document"  # a file brought to the consultation: a lab report, an ECG, a photo
    SNAPSHOT = "snapshot"  # a still of a video tile taken during the session


class AttachmentFormat(StrEnum):
    """What the file's bytes are (found from its content, never from its name); values are
    the media types it is served as."""

    JPEG = "image/jpeg"
    PNG = "image/png"
    PDF = "application/pdf"
    DICOM = "application/dicom"


@dataclass(frozen=True)
class Attachment:
    """A file in the consultation's record. Never changed after it is added."""

    id: AttachmentId
    consultation_id: ConsultationId
    # The session live when it was added; None before the first call or between calls.
    session_id: SessionId | None
    kind: AttachmentKind
    format: AttachmentFormat
    size_bytes: int
    # Of the plaintext (the file is sealed at rest like a recording).
    sha256: str
    # The name the uploader gave (shown to the team, never used to find the file).
    filename: str | None
    description: str | None
    added_by: UserId
    added_by_name: str
    added_by_role: Role
    added_at: datetime
    # A snapshot: when the frame was taken and of which track (the tile).
    taken_at: datetime | None = None
    track: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: UserId
    actor_role: Role
    action: AuditAction
    consultation_id: ConsultationId | None
    target: str | None
    remote_addr: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class SessionRecord:
    """Everything the record holds for one consultation, as one read."""

    consultation: Consultation
    sessions: list[Session]
    participations: list[Participation]
    events: list[SessionEvent]
    consents: list[Consent]
    opinions: list[OpinionVersion]
    decisions: list[FinalDecision]
    recordings: list[Recording]
    audit: list[AuditEntry]
    attachments: list[Attachment] = field(default_factory=list)
