"""Attachments: files in the consultation's record (a lab report, an ECG, a photo of the
wound, a DICOM image, a snapshot of a video tile). Who may add and read them, what each reader
is shown, and the audit entry of every access. The bytes themselves are the server's
(server/attachments.py stores, sniffs and seals them); the domain sees their hash and size.

Rules (docs/domain.md, "Attachments"):
- adding takes `add_attachment` on the consultation (policy.can: the team; a resident or
  guardian only through the invite to their own consultation), while it is open;
- reading takes `view_attachment`. Trainees read only a teaching session's attachments, only
  while the resident's teaching-use consent stands, only images and DICOM (a PDF report names
  the patient and cannot be stripped), and de-identified: no file name, no description, no
  patient's name as the uploader, and DICOM without the patient's identifiers;
- an attachment added while a session is live is in that session's event log (the timeline)
  and announced to the room; every read, list and download is audited."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from rooms.clock import Clock, utc_now
from rooms.consultations import RequestContext
from rooms.errors import Conflict, Forbidden, InvalidInput, NotFound
from rooms.model import (
    Attachment,
    AttachmentFormat,
    AttachmentId,
    AttachmentKind,
    AuditAction,
    Consultation,
    ConsultationId,
    EventKind,
    Session,
    UserId,
)
from rooms.outcome import Outcome, Target
from rooms.policy import require
from rooms.retention import CLOSED
from rooms.roles import PATIENT_ROLES, Permission, Role
from rooms.store import NewAuditEntry, RecordRepository, RecordStore, StoredAttachment
from rooms.visibility import teaching_consent_given

# Formats a snapshot of a video tile may be in (a browser's canvas gives either).
SNAPSHOT_FORMATS = frozenset({AttachmentFormat.JPEG, AttachmentFormat.PNG})
# What trainees may be shown: pictures the server can strip of identifiers (DICOM) or that
# carry none in their content the record knows of; never a document.
TRAINEE_FORMATS = frozenset({AttachmentFormat.JPEG, AttachmentFormat.PNG, AttachmentFormat.DICOM})


class AttachmentRefused(Forbidden):
    """A 403 whose code names the attachment rule that refused."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class NewAttachment:
    """What the server learnt of an uploaded file (already stored and hashed)."""

    id: AttachmentId
    kind: AttachmentKind
    format: AttachmentFormat
    size_bytes: int
    sha256: str
    filename: str | None
    description: str | None
    taken_at: datetime | None = None
    track: str | None = None


@dataclass(frozen=True)
class AttachmentRead:
    """An attachment as one reader may see it, and whether it was de-identified for them
    (then a DICOM file's metadata must be stripped, and its file is not handed out)."""

    attachment: Attachment
    deidentified: bool
    # Set when read for its content: where the sealed file is.
    path: str | None = None


@dataclass(frozen=True)
class Added:
    attachment: Attachment
    # The room's announcement, when a session is live (signaling delivers it).
    outcome: Outcome


def new_attachment_id() -> AttachmentId:
    return AttachmentId(f"att_{uuid.uuid4().hex[:16]}")


class AttachmentService:
    def __init__(self, store: RecordStore, clock: Clock = utc_now) -> None:
        self._store = store
        self._now = clock

    async def check_may_add(self, ctx: RequestContext, consultation_id: ConsultationId) -> None:
        """Before the file is read: may the caller add to this consultation now? (Checked
        again when the attachment is added.)"""
        async with self._store.reading() as tx:
            await self._addable(tx, ctx, consultation_id)

    async def add(
        self, ctx: RequestContext, consultation_id: ConsultationId, new: NewAttachment
    ) -> Added:
        """Puts the stored file into the record: the row, the live session's event, the audit
        entry, in one transaction. A snapshot needs a live session and an image."""
        if new.kind is AttachmentKind.SNAPSHOT and new.format not in SNAPSHOT_FORMATS:
            raise InvalidInput(
                f"a snapshot is a JPEG or PNG image, not {new.format.value}",
            )
        actor = ctx.actor
        async with self._store.transaction() as tx:
            await self._addable(tx, ctx, consultation_id, for_update=True)
            session = _live_session(await tx.list_sessions(consultation_id))
            if new.kind is AttachmentKind.SNAPSHOT and session is None:
                raise Conflict("a snapshot of a video tile is taken during a live session")
            now = self._now()
            attachment = Attachment(
                id=new.id,
                consultation_id=consultation_id,
                session_id=session.id if session is not None else None,
                kind=new.kind,
                format=new.format,
                size_bytes=new.size_bytes,
                sha256=new.sha256,
                filename=new.filename,
                description=new.description,
                added_by=actor.user_id,
                added_by_name=actor.name,
                added_by_role=actor.role,
                added_at=now,
                # A snapshot's time is when it was taken; the server's, if the client sent none.
                taken_at=(new.taken_at or now) if new.kind is AttachmentKind.SNAPSHOT else None,
                track=new.track,
            )
            await tx.add_attachment(attachment, path=stored_path(consultation_id, new.id))
            outcome = Outcome()
            if session is not None:
                await tx.append_event(
                    session.id,
                    now,
                    EventKind.ATTACHMENT_ADDED,
                    actor.user_id,
                    None,
                    event_data(attachment),
                )
                outcome.announce(
                    "attachment_added", announcement(attachment), Target.room(consultation_id)
                )
            await _audit(
                tx,
                ctx,
                AuditAction.ADD_ATTACHMENT,
                consultation_id,
                now,
                attachment.id,
                event_data(attachment),
            )
        return Added(attachment, outcome)

    async def list(
        self, ctx: RequestContext, consultation_id: ConsultationId
    ) -> list[AttachmentRead]:
        """The consultation's attachments the caller may see, oldest first (audited)."""
        async with self._store.transaction() as tx:
            consultation = await _consultation(tx, consultation_id)
            deidentified = await _reader(tx, ctx, consultation)
            found = await tx.list_attachments(consultation_id)
            await _audit(
                tx, ctx, AuditAction.VIEW_ATTACHMENT, consultation_id, self._now(), None, {}
            )
        if deidentified:
            found = [a for a in found if a.format in TRAINEE_FORMATS]
        return [AttachmentRead(shown(a, deidentified), deidentified) for a in found]

    async def open(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        attachment_id: AttachmentId,
        use: str,
    ) -> AttachmentRead:
        """One attachment, if the caller may see it (audited: `use` says what was read —
        "metadata", "content", "dicom", "image"). A trainee never gets a DICOM file itself,
        only its stripped metadata and image."""
        download = use != "metadata"
        async with self._store.transaction() as tx:
            consultation = await _consultation(tx, consultation_id)
            deidentified = await _reader(tx, ctx, consultation)
            stored = await tx.get_attachment(attachment_id)
            if stored is None or stored.attachment.consultation_id != consultation_id:
                # Another consultation's attachment is not found here, whoever asks.
                raise NotFound(f"no attachment {attachment_id} in consultation {consultation_id}")
            attachment = stored.attachment
            _check_trainee_use(attachment, deidentified, use)
            await _audit(
                tx,
                ctx,
                AuditAction.DOWNLOAD_ATTACHMENT if download else AuditAction.VIEW_ATTACHMENT,
                consultation_id,
                self._now(),
                attachment_id,
                {"use": use, "deidentified": deidentified},
            )
        return _read(stored, deidentified)

    async def _addable(
        self,
        tx: RecordRepository,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        *,
        for_update: bool = False,
    ) -> Consultation:
        consultation = await _consultation(tx, consultation_id, for_update=for_update)
        require(ctx.actor, Permission.ADD_ATTACHMENT, consultation)
        if consultation.status in CLOSED:
            raise Conflict(
                f"cannot add an attachment while the consultation is {consultation.status.value}"
            )
        return consultation


def stored_path(consultation_id: ConsultationId, attachment_id: AttachmentId) -> str:
    """Where an attachment's sealed file is, relative to the data directory (ids only: both
    are the server's own, never a client's)."""
    return f"attachments/{consultation_id}/{attachment_id}"


def shown(attachment: Attachment, deidentified: bool) -> Attachment:
    """`attachment` as a de-identified reader sees it: a file name or a description may name
    the patient, and so does the uploader's name when the patient uploaded."""
    if not deidentified:
        return attachment
    by_patient = attachment.added_by_role in PATIENT_ROLES
    return replace(
        attachment,
        filename=None,
        description=None,
        added_by=attachment.added_by if not by_patient else UserId(""),
        added_by_name=attachment.added_by_name if not by_patient else "",
    )


def event_data(a: Attachment) -> dict[str, Any]:
    """The session log's and the audit trail's entry: identifiers and hashes, no names."""
    data: dict[str, Any] = {
        "attachment": a.id,
        "kind": a.kind.value,
        "media_type": a.format.value,
        "size_bytes": a.size_bytes,
        "sha256": a.sha256,
    }
    if a.taken_at is not None:
        data["taken_at"] = a.taken_at.isoformat()
    if a.track is not None:
        data["track"] = a.track
    return data


def announcement(a: Attachment) -> dict[str, Any]:
    """`attachment_added` to the room (trainees too): what a client needs to fetch it with its
    own rights; no file name or description (a trainee is in the room)."""
    return {
        "consultation_id": a.consultation_id,
        "session_id": a.session_id,
        "at": a.added_at.isoformat(),
        "added_by_role": a.added_by_role.value,
        **event_data(a),
    }


def _live_session(sessions: list[Session]) -> Session | None:
    return next((s for s in reversed(sessions) if s.ended_at is None), None)


async def _consultation(
    tx: RecordRepository, consultation_id: ConsultationId, *, for_update: bool = False
) -> Consultation:
    consultation = await tx.get_consultation(consultation_id, for_update=for_update)
    if consultation is None:
        raise NotFound(f"no consultation {consultation_id}")
    return consultation


async def _reader(tx: RecordRepository, ctx: RequestContext, consultation: Consultation) -> bool:
    """Checks that the caller may read the attachments; whether they see them de-identified."""
    require(ctx.actor, Permission.VIEW_ATTACHMENT, consultation)
    if ctx.actor.role is not Role.TRAINEE:
        return False
    if not teaching_consent_given(consultation, await tx.list_consents(consultation.id)):
        raise AttachmentRefused(
            "teaching_consent_required",
            "trainees see a teaching session's attachments once the resident has consented to "
            "teaching use",
        )
    return True


def _check_trainee_use(attachment: Attachment, deidentified: bool, use: str) -> None:
    if not deidentified:
        return
    if attachment.format not in TRAINEE_FORMATS:
        # Not listed for them either: the same answer as for an attachment that is not there.
        raise NotFound(
            f"no attachment {attachment.id} in consultation {attachment.consultation_id}"
        )
    if attachment.format is AttachmentFormat.DICOM and use == "content":
        raise AttachmentRefused(
            "deidentified_only",
            "trainees are shown a DICOM file's image and its metadata without the patient's "
            "identifiers, not the file itself",
        )


def _read(stored: StoredAttachment, deidentified: bool) -> AttachmentRead:
    return AttachmentRead(shown(stored.attachment, deidentified), deidentified, stored.path)


async def _audit(
    tx: RecordRepository,
    ctx: RequestContext,
    action: AuditAction,
    consultation_id: ConsultationId,
    at: datetime,
    target: str | None,
    detail: dict[str, Any],
) -> None:
    await tx.append_audit(
        NewAuditEntry(
            at=at,
            actor=ctx.actor.user_id,
            actor_role=ctx.actor.role,
            action=action,
            consultation_id=consultation_id,
            target=target,
            remote_addr=ctx.remote_addr,
            detail=detail,
        )
    )
