"""The durable record: rooms.store.RecordStore over SQLAlchemy Core (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Executable,
    Select,
    Table,
    and_,
    delete,
    exists,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ColumnElement

from rooms.errors import Conflict, NotFound, Unavailable
from rooms.model import (
    Attachment,
    AttachmentId,
    AuditEntry,
    CloseReason,
    Consent,
    Consultation,
    ConsultationId,
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
from rooms.store import (
    ConsultationFilter,
    InviteCode,
    NewAuditEntry,
    NewEvent,
    RecordRepository,
    RecordStore,
    SeatRecord,
    StoredAttachment,
    StoredRecording,
)
from server.db import chain
from server.db import mapping as m
from server.db.engine import READ_ONLY, SQLITE_PRAGMAS, make_engine, sqlite_path
from server.db.hot import HotPath, create_hot_path
from server.db.tables import (
    attachments,
    audit_log,
    consents,
    consultations,
    final_decisions,
    invite_codes,
    legal_holds,
    opinion_signatures,
    opinion_versions,
    participations,
    recordings,
    revoked_tokens,
    session_events,
    sessions,
    team_members,
)


def select_stored_recordings() -> Select[Any]:
    """Recordings with their session's consultation (see mapping.stored_recording_from_row)."""
    return select(recordings, sessions.c.consultation_id).join(
        sessions, sessions.c.id == recordings.c.session_id
    )


# SQLSTATE (PostgreSQL) and extended result codes (SQLite) of the constraint violations.
_PG_UNIQUE = "23505"
_SQLITE_UNIQUE = {1555, 2067}  # SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE

log = logging.getLogger(__name__)


class SqlRecordStore(RecordStore):
    """Opens the engine on start(); each transaction() is one database transaction."""

    def __init__(self, database_url: str, *, connect_args: Mapping[str, Any] | None = None) -> None:
        self._url = database_url
        self._connect_args = connect_args
        self._engine: AsyncEngine | None = None
        # SQLite has one writer at a time: writers queue here, in order, instead of polling
        # the file lock (its busy handler sleeps up to 100 ms between tries).
        self._sqlite_writer = asyncio.Lock() if sqlite_path(database_url) is not None else None
        self._hot: HotPath | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("SqlRecordStore is not started")
        return self._engine

    async def start(self) -> None:
        if self._engine is None:
            self._engine = make_engine(self._url, connect_args=self._connect_args)
            hot = create_hot_path(
                self._url,
                self._engine.dialect,
                sqlite_file=sqlite_path(self._url),
                writer=self._sqlite_writer,
                pragmas=SQLITE_PRAGMAS,
                connect_args=self._connect_args or {},
            )
            if hot is not None:
                await hot.start()
            self._hot = hot

    async def stop(self) -> None:
        hot, self._hot = self._hot, None
        if hot is not None:
            await hot.stop()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlRecordRepository]:
        with _reachable():
            if self._sqlite_writer is None:
                async with self.engine.begin() as conn:
                    yield SqlRecordRepository(conn)
                return
            async with self._sqlite_writer, self.engine.begin() as conn:
                yield SqlRecordRepository(conn)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqlRecordRepository]:
        """A read-only transaction whose every statement sees the same committed state (for
        verification: the chain heads and the rows must agree). SQLite's read transaction in
        WAL mode already does; PostgreSQL needs REPEATABLE READ for it."""
        with _reachable():
            async with self.engine.connect() as plain:
                options: dict[str, Any] = {READ_ONLY: True}
                if plain.dialect.name == "postgresql":
                    options["isolation_level"] = "REPEATABLE READ"
                conn = await plain.execution_options(**options)
                async with conn.begin():
                    yield SqlRecordRepository(conn)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[SqlRecordRepository]:
        with _reachable():
            async with self.engine.connect() as plain:
                conn = await plain.execution_options(**{READ_ONLY: True})
                async with conn.begin():
                    yield SqlRecordRepository(conn)

    # -- the signaling hot path (server/db/hot.py; the repository's way where it has none) ----

    async def append_chat(self, event: NewEvent) -> SessionEvent:
        if self._hot is not None:
            return await self._hot.append_chat(event)
        async with self.transaction() as tx:
            return await tx.append_event(
                event.session_id,
                event.at,
                event.kind,
                event.actor,
                event.participant_id,
                event.data,
            )

    async def seat(
        self, participation: Participation, joined: NewEvent, chat_limit: int
    ) -> SeatRecord:
        if self._hot is not None:
            return await self._hot.seat(participation, joined, chat_limit)
        async with self.transaction() as tx:
            await tx.add_participation(participation)
            event = await tx.append_event(
                joined.session_id,
                joined.at,
                joined.kind,
                joined.actor,
                joined.participant_id,
                joined.data,
            )
            chat = await tx.list_session_events(
                participation.session_id, EventKind.CHAT, chat_limit
            )
            consultation_id = await tx.consultation_of(participation.session_id)
            return SeatRecord(event, chat, await tx.list_consents(consultation_id))

    async def get_consultation(self, consultation_id: ConsultationId) -> Consultation | None:
        if self._hot is not None:
            return await self._hot.get_consultation(consultation_id)
        async with self.reading() as tx:
            return await tx.get_consultation(consultation_id)

    async def is_token_revoked(self, jti: str) -> bool:
        if self._hot is not None:
            return await self._hot.is_token_revoked(jti)
        async with self.reading() as tx:
            return await tx.is_token_revoked(jti)


@contextmanager
def _reachable() -> Iterator[None]:
    """The database being away (PostgreSQL restarting, SQLite's disk full or locked too long)
    becomes Unavailable: the transaction was rolled back, nothing of it was kept, and the
    caller answers "try again" instead of an internal error with a traceback."""
    try:
        yield
    except IntegrityError:
        raise
    except (OperationalError, InterfaceError, OSError) as exc:
        log.warning("the database is unavailable: %s", type(exc).__name__)
        raise Unavailable("the record store is unavailable; try again shortly") from None
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("the database connection was lost: %s", type(exc.orig).__name__)
        raise Unavailable("the record store is unavailable; try again shortly") from None


class SqlRecordRepository(RecordRepository):
    """Bound to one connection inside one transaction; commit and rollback belong to the store.

    Events and audit entries are only ever inserted (the database refuses anything else), each
    onto its hash chain (server/db/chain.py). Within one transaction events come before audit
    entries, so that every transaction locks chain heads in the same order and two of them
    cannot deadlock on PostgreSQL."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._audit_appended = False

    @property
    def connection(self) -> AsyncConnection:
        """The transaction's connection, for server/db/retention.py's deletes."""
        return self._conn

    # -- helpers -----------------------------------------------------------------------------

    async def _rows(self, statement: Executable) -> Sequence[RowMapping]:
        return (await self._conn.execute(statement)).mappings().all()

    async def _insert(self, table: Table, values: dict[str, Any], *, duplicate: str) -> None:
        """Insert one row; a violated constraint becomes Conflict.

        The SAVEPOINT keeps the transaction usable after a conflict: PostgreSQL would otherwise
        refuse every further statement in it, SQLite would not, and callers must not care."""
        try:
            async with self._conn.begin_nested():
                await self._conn.execute(insert(table).values(values))
        except IntegrityError as exc:
            raise _conflict(exc, duplicate, f"{table.name} row") from exc

    async def _team(self, ids: Sequence[str]) -> dict[str, list[TeamMember]]:
        teams: dict[str, list[TeamMember]] = defaultdict(list)
        if ids:
            rows = await self._rows(
                select(team_members)
                .where(team_members.c.consultation_id.in_(ids))
                .order_by(team_members.c.added_at, team_members.c.id)
            )
            for row in rows:
                teams[row["consultation_id"]].append(m.team_member_from_row(row))
        return teams

    # -- consultations -----------------------------------------------------------------------

    async def add_consultation(self, consultation: Consultation) -> None:
        await self._insert(
            consultations,
            m.consultation_values(consultation),
            duplicate=f"consultation {consultation.id} already exists",
        )
        for member in consultation.team:
            await self.add_team_member(consultation.id, member)

    async def get_consultation(
        self, consultation_id: ConsultationId, *, for_update: bool = False
    ) -> Consultation | None:
        query = select(consultations).where(consultations.c.id == consultation_id)
        if for_update:
            # Row lock on PostgreSQL; SQLite omits the clause, its BEGIN IMMEDIATE already
            # serialises writers (see engine.py).
            query = query.with_for_update()
        row = (await self._conn.execute(query)).mappings().one_or_none()
        if row is None:
            return None
        team = await self._team([consultation_id])
        return m.consultation_from_row(row, team[consultation_id])

    async def list_consultations(self, query: ConsultationFilter) -> list[Consultation]:
        c = consultations.c
        t = team_members.c
        on_team = t.consultation_id == c.id
        conditions: list[ColumnElement[bool]] = []
        if query.status is not None:
            conditions.append(c.status == query.status.value)
        if query.member is not None:
            conditions.append(exists().where(on_team, t.user_id == query.member))
        if query.role is not None:
            conditions.append(exists().where(on_team, t.role == query.role.value))
        if query.institution is not None:
            conditions.append(
                or_(
                    c.inviting_institution == query.institution,
                    exists().where(on_team, t.institution == query.institution),
                )
            )
        if query.inviting_institution is not None:
            conditions.append(c.inviting_institution == query.inviting_institution)
        rows = await self._rows(
            select(consultations)
            .where(*conditions)
            .order_by(c.created_at.desc(), c.id.desc())
            .limit(query.limit)
            .offset(query.offset)
        )
        teams = await self._team([row["id"] for row in rows])
        return [m.consultation_from_row(row, teams[row["id"]]) for row in rows]

    async def update_consultation_state(self, consultation: Consultation) -> None:
        result = await self._conn.execute(
            update(consultations)
            .where(consultations.c.id == consultation.id)
            .values(
                status=consultation.status.value,
                status_reason=consultation.status_reason,
                scheduled_time=consultation.scheduled_time,
                updated_at=consultation.updated_at,
            )
        )
        if result.rowcount == 0:
            raise NotFound(f"consultation {consultation.id} does not exist")

    async def add_team_member(self, consultation_id: ConsultationId, member: TeamMember) -> None:
        await self._insert(
            team_members,
            m.team_member_values(consultation_id, member),
            duplicate=f"{member.user_id} is already on the team of consultation {consultation_id}",
        )

    # -- sessions and participations ---------------------------------------------------------

    async def add_session(self, session: Session) -> None:
        await self._insert(
            sessions,
            m.session_values(session),
            duplicate=f"session {session.id} (number {session.number} of consultation "
            f"{session.consultation_id}) already exists",
        )

    async def end_session(self, session_id: SessionId, ended_at: datetime, reason: str) -> None:
        result = await self._conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
            .values(ended_at=ended_at, end_reason=reason)
        )
        if result.rowcount == 0 and not await self._exists(sessions.c.id == session_id):
            raise NotFound(f"session {session_id} does not exist")

    async def list_open_sessions(self) -> list[Session]:
        rows = await self._rows(
            select(sessions).where(sessions.c.ended_at.is_(None)).order_by(sessions.c.started_at)
        )
        return [m.session_from_row(row) for row in rows]

    async def list_sessions(self, consultation_id: ConsultationId) -> list[Session]:
        rows = await self._rows(
            select(sessions)
            .where(sessions.c.consultation_id == consultation_id)
            .order_by(sessions.c.number)
        )
        return [m.session_from_row(row) for row in rows]

    async def add_participation(self, participation: Participation) -> None:
        await self._insert(
            participations,
            m.participation_values(participation),
            duplicate=f"participant {participation.participant_id} already joined session "
            f"{participation.session_id}",
        )

    async def close_participation(
        self,
        session_id: SessionId,
        participant_id: ParticipantId,
        left_at: datetime,
        reason: CloseReason,
    ) -> None:
        """Closes once: the first reason a participant left is the one the record keeps."""
        p = participations.c
        key = and_(p.session_id == session_id, p.participant_id == participant_id)
        result = await self._conn.execute(
            update(participations)
            .where(key, p.left_at.is_(None))
            .values(left_at=left_at, close_reason=reason.value)
        )
        if result.rowcount == 0 and not await self._exists(key):
            raise NotFound(f"participant {participant_id} is not in session {session_id}")

    async def list_participations(self, consultation_id: ConsultationId) -> list[Participation]:
        p = participations.c
        rows = await self._rows(
            select(participations)
            .join(sessions, sessions.c.id == p.session_id)
            .where(sessions.c.consultation_id == consultation_id)
            .order_by(p.joined_at, p.session_id, p.participant_id)
        )
        return [m.participation_from_row(row) for row in rows]

    # -- the session event log (append-only) -------------------------------------------------

    async def append_event(
        self,
        session_id: SessionId,
        at: datetime,
        kind: EventKind,
        actor: UserId | None,
        participant_id: ParticipantId | None,
        data: dict[str, Any],
    ) -> SessionEvent:
        if self._audit_appended:
            raise RuntimeError("append events before audit entries in one transaction")
        consultation_id = await self.consultation_of(session_id)
        values = {
            "session_id": session_id,
            "at": at,
            "kind": kind.value,
            "actor": actor,
            "participant_id": participant_id,
            "data": data,
        }
        seq = await self._append_linked(
            session_events, values, chain.event_chain(consultation_id), chain.EVENT_FIELDS
        )
        return SessionEvent(
            session_id=session_id,
            seq=seq,
            at=at.astimezone(UTC),
            kind=kind,
            actor=actor,
            participant_id=participant_id,
            data=data,
        )

    async def consultation_of(self, session_id: SessionId) -> ConsultationId:
        consultation_id = await self._conn.scalar(
            select(sessions.c.consultation_id).where(sessions.c.id == session_id)
        )
        if consultation_id is None:
            raise Conflict(f"event of session {session_id} refers to a record that does not exist")
        return ConsultationId(consultation_id)

    async def list_session_events(
        self, session_id: SessionId, kind: EventKind, limit: int
    ) -> list[SessionEvent]:
        e = session_events.c
        rows = await self._rows(
            select(session_events)
            .where(e.session_id == session_id, e.kind == kind.value)
            .order_by(e.id.desc())
            .limit(limit)
        )
        return [m.event_from_row(row) for row in reversed(rows)]

    async def list_events(self, consultation_id: ConsultationId) -> list[SessionEvent]:
        e = session_events.c
        rows = await self._rows(
            select(session_events)
            .join(sessions, sessions.c.id == e.session_id)
            .where(sessions.c.consultation_id == consultation_id)
            .order_by(e.id)
        )
        return [m.event_from_row(row) for row in rows]

    # -- consents, opinions, decisions, recordings -------------------------------------------

    async def add_consent(self, consent: Consent) -> None:
        await self._insert(consents, m.consent_values(consent), duplicate="duplicate consent")

    async def list_consents(self, consultation_id: ConsultationId) -> list[Consent]:
        rows = await self._rows(
            select(consents)
            .where(consents.c.consultation_id == consultation_id)
            .order_by(consents.c.at, consents.c.id)
        )
        return [m.consent_from_row(row) for row in rows]

    async def add_opinion_version(self, version: OpinionVersion) -> None:
        await self._insert(
            opinion_versions,
            m.opinion_values(version),
            duplicate=f"version {version.version} of the opinion on consultation "
            f"{version.consultation_id} already exists",
        )
        for signature in version.signatures:
            await self.add_signature(version.consultation_id, signature)

    async def add_signature(self, consultation_id: ConsultationId, signature: Signature) -> None:
        await self._insert(
            opinion_signatures,
            m.signature_values(consultation_id, signature),
            duplicate=f"{signature.signer} has already signed version {signature.version} "
            f"of the opinion on consultation {consultation_id}",
        )

    async def list_opinion_versions(self, consultation_id: ConsultationId) -> list[OpinionVersion]:
        s = opinion_signatures.c
        signature_rows = await self._rows(
            select(opinion_signatures)
            .where(s.consultation_id == consultation_id)
            .order_by(s.signed_at, s.id)
        )
        by_version: dict[int, list[Signature]] = defaultdict(list)
        for row in signature_rows:
            by_version[row["version"]].append(m.signature_from_row(row))
        rows = await self._rows(
            select(opinion_versions)
            .where(opinion_versions.c.consultation_id == consultation_id)
            .order_by(opinion_versions.c.version)
        )
        return [m.opinion_from_row(row, by_version[row["version"]]) for row in rows]

    async def add_decision(self, decision: FinalDecision) -> None:
        await self._insert(
            final_decisions, m.decision_values(decision), duplicate="duplicate decision"
        )

    async def list_decisions(self, consultation_id: ConsultationId) -> list[FinalDecision]:
        rows = await self._rows(
            select(final_decisions)
            .where(final_decisions.c.consultation_id == consultation_id)
            .order_by(final_decisions.c.at, final_decisions.c.id)
        )
        return [m.decision_from_row(row) for row in rows]

    async def add_recording(self, recording: Recording, path: str | None = None) -> None:
        await self._insert(
            recordings,
            {**m.recording_values(recording), "path": path},
            duplicate=f"recording {recording.id} already exists",
        )

    async def update_recording(self, recording: Recording) -> None:
        values = m.recording_values(recording)
        changing = (
            "state",
            "sha256",
            "duration_s",
            "size_bytes",
            "ended_at",
            "progress",
            "offset_s",
            "node",
        )
        result = await self._conn.execute(
            update(recordings)
            .where(recordings.c.id == recording.id)
            .values({k: values[k] for k in changing})
        )
        if result.rowcount == 0:
            raise NotFound(f"recording {recording.id} does not exist")

    async def get_recording(self, recording_id: RecordingId) -> StoredRecording | None:
        rows = await self._rows(select_stored_recordings().where(recordings.c.id == recording_id))
        return m.stored_recording_from_row(rows[0]) if rows else None

    async def list_stored_recordings(
        self, *, state: str | None = None, session_id: SessionId | None = None
    ) -> list[StoredRecording]:
        query = select_stored_recordings().order_by(recordings.c.started_at, recordings.c.id)
        if state is not None:
            query = query.where(recordings.c.state == state)
        if session_id is not None:
            query = query.where(recordings.c.session_id == session_id)
        return [m.stored_recording_from_row(row) for row in await self._rows(query)]

    async def list_recordings(self, consultation_id: ConsultationId) -> list[Recording]:
        r = recordings.c
        rows = await self._rows(
            select(recordings)
            .join(sessions, sessions.c.id == r.session_id)
            .where(sessions.c.consultation_id == consultation_id)
            .order_by(r.started_at, r.id)
        )
        return [m.recording_from_row(row) for row in rows]

    # -- attachments -------------------------------------------------------------------------

    async def add_attachment(self, attachment: Attachment, path: str) -> None:
        await self._insert(
            attachments,
            m.attachment_values(attachment, path),
            duplicate=f"attachment {attachment.id} already exists",
        )

    async def get_attachment(self, attachment_id: AttachmentId) -> StoredAttachment | None:
        rows = await self._rows(select(attachments).where(attachments.c.id == attachment_id))
        return m.stored_attachment_from_row(rows[0]) if rows else None

    async def list_attachments(self, consultation_id: ConsultationId) -> list[Attachment]:
        a = attachments.c
        rows = await self._rows(
            select(attachments)
            .where(a.consultation_id == consultation_id)
            .order_by(a.added_at, a.id)
        )
        return [m.attachment_from_row(row) for row in rows]

    # -- revoked tokens ----------------------------------------------------------------------

    async def revoke_token(self, jti: str, expires_at: datetime, revoked_at: datetime) -> None:
        """Idempotent: revoking a revoked token keeps the first revocation."""
        dialect_insert = (
            postgresql.insert if self._conn.dialect.name == "postgresql" else sqlite.insert
        )
        await self._conn.execute(
            dialect_insert(revoked_tokens)
            .values(jti=jti, expires_at=expires_at, revoked_at=revoked_at)
            .on_conflict_do_nothing(index_elements=[revoked_tokens.c.jti])
        )

    async def is_token_revoked(self, jti: str) -> bool:
        return await self._exists(revoked_tokens.c.jti == jti)

    # -- invite codes ------------------------------------------------------------------------

    async def add_invite_code(self, code: InviteCode) -> None:
        await self._insert(invite_codes, m.invite_code_row(code), duplicate="invite code")

    async def get_invite_code(self, code_hash: str) -> InviteCode | None:
        rows = await self._rows(select(invite_codes).where(invite_codes.c.code_hash == code_hash))
        return m.invite_code_from_row(rows[0]) if rows else None

    async def purge_invite_codes(self, expired_by: datetime) -> int:
        result = await self._conn.execute(
            delete(invite_codes).where(invite_codes.c.expires_at <= expired_by)
        )
        return int(result.rowcount or 0)

    # -- legal holds -------------------------------------------------------------------------

    async def get_legal_hold(self, consultation_id: ConsultationId) -> LegalHold | None:
        h = legal_holds.c
        row = (
            (
                await self._conn.execute(
                    select(legal_holds)
                    .where(h.consultation_id == consultation_id, h.released_at.is_(None))
                    .order_by(h.id.desc())
                    .limit(1)
                )
            )
            .mappings()
            .one_or_none()
        )
        return m.legal_hold_from_row(row) if row is not None else None

    async def place_legal_hold(self, hold: LegalHold) -> None:
        await self._insert(legal_holds, m.legal_hold_values(hold), duplicate="duplicate hold")

    async def release_legal_hold(
        self,
        consultation_id: ConsultationId,
        released_by: UserId,
        released_at: datetime,
        reason: str,
    ) -> None:
        h = legal_holds.c
        result = await self._conn.execute(
            update(legal_holds)
            .where(h.consultation_id == consultation_id, h.released_at.is_(None))
            .values(released_by=released_by, released_at=released_at, release_reason=reason)
        )
        if result.rowcount == 0:
            raise NotFound(f"consultation {consultation_id} is not on legal hold")

    # -- the audit log (append-only) ---------------------------------------------------------

    async def append_audit(self, entry: NewAuditEntry) -> AuditEntry:
        self._audit_appended = True
        seq = await self._append_linked(
            audit_log, m.audit_values(entry), chain.AUDIT_CHAIN, chain.AUDIT_FIELDS
        )
        return AuditEntry(
            seq=seq,
            at=entry.at.astimezone(UTC),
            actor=entry.actor,
            actor_role=entry.actor_role,
            action=entry.action,
            consultation_id=entry.consultation_id,
            target=entry.target,
            remote_addr=entry.remote_addr,
            detail=entry.detail,
        )

    async def list_audit(
        self, consultation_id: ConsultationId | None, limit: int, after_seq: int
    ) -> list[AuditEntry]:
        """Oldest first after after_seq; with consultation_id None, entries of all consultations."""
        query = select(audit_log).where(audit_log.c.id > after_seq)
        if consultation_id is not None:
            query = query.where(audit_log.c.consultation_id == consultation_id)
        rows = await self._rows(query.order_by(audit_log.c.id).limit(limit))
        return [m.audit_from_row(row) for row in rows]

    async def _append_linked(
        self, table: Table, values: dict[str, Any], chain_name: str, fields: tuple[str, ...]
    ) -> int:
        """Inserts a row onto its chain: head locked, hash of the row and the head, head moved."""
        prev_hash = await chain.lock_head(self._conn, chain_name)
        digest = chain.row_hash(prev_hash, values, fields)
        seq = await self._conn.scalar(
            insert(table)
            .values({**values, "prev_hash": prev_hash, "hash": digest})
            .returning(table.c.id)
        )
        assert seq is not None
        await chain.move_head(self._conn, chain_name, digest, seq)
        return int(seq)

    async def _exists(self, condition: ColumnElement[bool]) -> bool:
        return bool(await self._conn.scalar(select(exists().where(condition))))


def _conflict(exc: IntegrityError, duplicate: str, what: str) -> Conflict:
    """A readable Conflict for a violated constraint, instead of the driver's message."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == _PG_UNIQUE or (
        getattr(orig, "sqlite_errorcode", None) in _SQLITE_UNIQUE
    ):
        return Conflict(duplicate)
    return Conflict(f"{what} refers to a record that does not exist")
