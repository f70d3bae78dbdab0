"""What the domain needs from durable storage. Implementations live with their dependency
(SQL in server/db); the domain imports none of them."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from rooms.model import (
    Attachment,
    AttachmentId,
    AuditAction,
    AuditEntry,
    CloseReason,
    Consent,
    Consultation,
    ConsultationId,
    ConsultationStatus,
    EventKind,
    FinalDecision,
    OpinionVersion,
    ParticipantId,
    Participation,
    Recording,
    RecordingId,
    Session,
    SessionEvent,
    SessionId,
    Signature,
    TeamMember,
    UserId,
)
from rooms.retention import LegalHold
from rooms.roles import Role


@dataclass(frozen=True)
class ConsultationFilter:
    status: ConsultationStatus | None = None
    # Consultations on whose team this user is.
    member: UserId | None = None
    # Consultations on whose team someone of this role is.
    role: Role | None = None
    # Consultations that involve this institution (inviting or on the team).
    institution: str | None = None
    # Consultations requested by this institution.
    inviting_institution: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class StoredRecording:
    """A recording with its consultation and its file's path (relative to the data
    directory; never shown to clients)."""

    recording: Recording
    consultation_id: ConsultationId
    path: str | None


@dataclass(frozen=True)
class StoredAttachment:
    """An attachment with its file's path (relative to the data directory; never shown)."""

    attachment: Attachment
    path: str


@dataclass(frozen=True)
class NewEvent:
    """An event to append to a session's log (the log assigns its seq)."""

    session_id: SessionId
    at: datetime
    kind: EventKind
    actor: UserId | None
    participant_id: ParticipantId | None
    data: dict[str, Any]


@dataclass(frozen=True)
class SeatRecord:
    """What taking a seat wrote (the `joined` event) and read in the same transaction for the
    seat's snapshot: the session's newest chat (oldest first) and the consultation's consents."""

    joined: SessionEvent
    chat: list[SessionEvent]
    consents: list[Consent]


@dataclass(frozen=True)
class NewAuditEntry:
    at: datetime
    actor: UserId
    actor_role: Role
    action: AuditAction
    consultation_id: ConsultationId | None
    target: str | None
    remote_addr: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class InviteCode:
    """A short invite code as stored: its HMAC and the invite it stands for, never the code
    (rooms/invite_codes.py)."""

    code_hash: str
    consultation_id: ConsultationId
    jti: str
    user_id: UserId
    name: str
    role: Role
    org: str
    expires_at: datetime
    created_at: datetime


class RecordRepository(Protocol):
    """Reads and writes inside one transaction. Events and audit entries are append-only:
    there is deliberately no method that changes or removes them."""

    async def add_consultation(self, consultation: Consultation) -> None: ...

    async def get_consultation(
        self, consultation_id: ConsultationId, *, for_update: bool = False
    ) -> Consultation | None: ...

    async def list_consultations(self, query: ConsultationFilter) -> list[Consultation]: ...

    async def update_consultation_state(self, consultation: Consultation) -> None:
        """Persist status, status_reason, scheduled_time and updated_at."""
        ...

    async def add_team_member(
        self, consultation_id: ConsultationId, member: TeamMember
    ) -> None: ...

    async def add_session(self, session: Session) -> None: ...

    async def end_session(self, session_id: SessionId, ended_at: datetime, reason: str) -> None:
        """Sets the end once; ending an ended session keeps the first end."""
        ...

    async def list_open_sessions(self) -> list[Session]:
        """Sessions of any consultation that have not ended (crash recovery)."""
        ...

    async def list_sessions(self, consultation_id: ConsultationId) -> list[Session]: ...

    async def add_participation(self, participation: Participation) -> None: ...

    async def close_participation(
        self,
        session_id: SessionId,
        participant_id: ParticipantId,
        left_at: datetime,
        reason: CloseReason,
    ) -> None: ...

    async def list_participations(self, consultation_id: ConsultationId) -> list[Participation]: ...

    async def append_event(
        self,
        session_id: SessionId,
        at: datetime,
        kind: EventKind,
        actor: UserId | None,
        participant_id: ParticipantId | None,
        data: dict[str, Any],
    ) -> SessionEvent: ...

    async def list_events(self, consultation_id: ConsultationId) -> list[SessionEvent]: ...

    async def list_session_events(
        self, session_id: SessionId, kind: EventKind, limit: int
    ) -> list[SessionEvent]:
        """The newest `limit` events of one kind in one session, oldest first."""
        ...

    async def add_consent(self, consent: Consent) -> None: ...

    async def list_consents(self, consultation_id: ConsultationId) -> list[Consent]: ...

    async def add_opinion_version(self, version: OpinionVersion) -> None: ...

    async def add_signature(
        self, consultation_id: ConsultationId, signature: Signature
    ) -> None: ...

    async def list_opinion_versions(self, consultation_id: ConsultationId) -> list[OpinionVersion]:
        """All versions, oldest first, each with its signatures."""
        ...

    async def add_decision(self, decision: FinalDecision) -> None: ...

    async def list_decisions(self, consultation_id: ConsultationId) -> list[FinalDecision]: ...

    async def add_recording(self, recording: Recording, path: str | None = None) -> None:
        """`path` (relative to the data directory) is where the file is; never shown."""
        ...

    async def update_recording(self, recording: Recording) -> None:
        """Writes what changes as a recording goes on: state, hash, duration, size, end,
        progress, and (a composite made again) its offset."""
        ...

    async def get_recording(self, recording_id: RecordingId) -> StoredRecording | None: ...

    async def list_recordings(self, consultation_id: ConsultationId) -> list[Recording]: ...

    async def list_stored_recordings(
        self, *, state: str | None = None, session_id: SessionId | None = None
    ) -> list[StoredRecording]:
        """Recordings with their consultation and path, in a state and/or of a session."""
        ...

    async def add_attachment(self, attachment: Attachment, path: str) -> None:
        """`path` (relative to the data directory) is where the sealed file is; never shown."""
        ...

    async def get_attachment(self, attachment_id: AttachmentId) -> StoredAttachment | None: ...

    async def list_attachments(self, consultation_id: ConsultationId) -> list[Attachment]:
        """Oldest first."""
        ...

    async def revoke_token(self, jti: str, expires_at: datetime, revoked_at: datetime) -> None: ...

    async def is_token_revoked(self, jti: str) -> bool: ...

    async def add_invite_code(self, code: InviteCode) -> None:
        """Conflict when the same hash is stored already."""
        ...

    async def get_invite_code(self, code_hash: str) -> InviteCode | None: ...

    async def purge_invite_codes(self, expired_by: datetime) -> int:
        """Deletes the codes expired by then; returns how many."""
        ...

    async def get_legal_hold(self, consultation_id: ConsultationId) -> LegalHold | None:
        """The hold in force on a consultation, if any."""
        ...

    async def place_legal_hold(self, hold: LegalHold) -> None: ...

    async def release_legal_hold(
        self,
        consultation_id: ConsultationId,
        released_by: UserId,
        released_at: datetime,
        reason: str,
    ) -> None:
        """Ends the hold in force; it stays in the history of holds."""
        ...

    async def append_audit(self, entry: NewAuditEntry) -> AuditEntry: ...

    async def list_audit(
        self, consultation_id: ConsultationId | None, limit: int, after_seq: int
    ) -> list[AuditEntry]: ...


class RecordStore(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[RecordRepository]:
        """Everything done through the repository commits together or not at all."""
        ...

    def reading(self) -> AbstractAsyncContextManager[RecordRepository]:
        """A read-only transaction: never waits for writers (use it for nothing but reads)."""
        ...

    async def ping(self) -> None:
        """Raises if the database cannot be reached."""
        ...

    # The signaling hot path: each is one transaction of as few statements as the backend
    # allows, the same rows as the repository's methods would write.

    async def append_chat(self, event: NewEvent) -> SessionEvent:
        """Appends a chat event; returns once it is committed (several chats arriving
        together may share one transaction, in the order they arrived)."""
        ...

    async def seat(
        self, participation: Participation, joined: NewEvent, chat_limit: int
    ) -> SeatRecord:
        """Records a participant taking a seat (the participation and its `joined` event) and
        reads what the seat's snapshot needs, in one transaction."""
        ...

    async def get_consultation(self, consultation_id: ConsultationId) -> Consultation | None:
        """The consultation with its team, in one consistent read (never waits for writers)."""
        ...

    async def is_token_revoked(self, jti: str) -> bool:
        """Whether the token `jti` was revoked (a read; never waits for writers)."""
        ...
