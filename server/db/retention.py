"""Destruction of expired records: the one module that deletes from the record.

Everything else in server/db only ever inserts into the event log and the audit log, and the
database refuses anything else (triggers, migration 0004) except a DELETE made while the
`retention_marker` row exists. That row is inserted and deleted by _destroying() around each
delete here, inside the retention transaction, so it is never committed and no other
transaction sees it: this is the one path by which rows leave those tables.

Destruction is kept apart from the store the server runs on so that no request
can reach it: only `telemed retention run` (server/retention.py) uses it, always inside one
transaction per consultation that has first locked the consultation's row and checked its
legal hold.

The audit log: entries are deleted only by purge_audit(), only when older than their period,
never while the consultation is on hold, and never `destroy` entries. Each purge is itself
recorded by a `destroy` entry appended in the same transaction. See docs/api.md ("Retention")
for why access entries expire and the destruction log does not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, insert, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ColumnElement

from rooms.model import ConsultationId, RecordingId
from rooms.retention import (
    ACCESS_ACTIONS,
    CLOSED,
    NEVER_PURGED,
    UNFINISHED_RECORDING_STATES,
)
from rooms.store import StoredRecording
from server.db import chain
from server.db import mapping as m
from server.db.store import select_stored_recordings
from server.db.tables import (
    attachments,
    audit_log,
    chain_heads,
    consents,
    consultations,
    final_decisions,
    legal_holds,
    opinion_signatures,
    opinion_versions,
    participations,
    recordings,
    retention_marker,
    session_events,
    sessions,
    team_members,
)

_ACCESS = sorted(a.value for a in ACCESS_ACTIONS)
_NEVER = sorted(a.value for a in NEVER_PURGED)


@dataclass(frozen=True)
class ClosedRecord:
    consultation_id: ConsultationId
    status: str
    closed_at: datetime


@dataclass(frozen=True)
class PurgedAudit:
    count: int
    first_seq: int
    last_seq: int
    actions: dict[str, int]
    # The deleted rows as runs of the audit chain (empty in a dry run): their destroy entry
    # keeps them so that verification can bridge exactly these gaps.
    runs: tuple[chain.ChainRun, ...] = ()


@dataclass(frozen=True)
class DestroyedRecord:
    rows: dict[str, int]
    # The head of the consultation's event chain, gone with the events.
    event_chain_head: str | None


def _not_held(consultation_id: Any) -> ColumnElement[bool]:
    h = legal_holds.c
    return ~exists().where(h.consultation_id == consultation_id, h.released_at.is_(None))


def _record_gone(consultation_id: Any) -> ColumnElement[bool]:
    return ~exists().where(consultations.c.id == consultation_id)


class RetentionRepository:
    """Reads of what has expired and the deletes themselves, on one connection inside one
    transaction (the caller's)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    # -- what has expired ----------------------------------------------------------------------

    async def expired_recordings(
        self, cutoff: datetime, consultation_id: ConsultationId | None = None
    ) -> list[StoredRecording]:
        """Finished recordings that ended before `cutoff`, of consultations not on hold."""
        r, s = recordings.c, sessions.c
        query = (
            select_stored_recordings()
            .where(
                func.coalesce(r.ended_at, r.started_at) < cutoff,
                r.state.not_in(sorted(UNFINISHED_RECORDING_STATES)),
                _not_held(s.consultation_id),
            )
            .order_by(s.consultation_id, r.started_at, r.id)
        )
        if consultation_id is not None:
            query = query.where(s.consultation_id == consultation_id)
        return await self._stored(query)

    async def recordings_of(self, consultation_id: ConsultationId) -> list[StoredRecording]:
        r, s = recordings.c, sessions.c
        return await self._stored(
            select_stored_recordings()
            .where(s.consultation_id == consultation_id)
            .order_by(r.started_at, r.id)
        )

    async def attachment_files_of(self, consultation_id: ConsultationId) -> list[dict[str, Any]]:
        """The consultation's attachments as its destruction entry keeps them, with their paths
        (relative to the data directory) to delete."""
        a = attachments.c
        rows = await self._conn.execute(
            select(a.id, a.media_type, a.sha256, a.size_bytes, a.path)
            .where(a.consultation_id == consultation_id)
            .order_by(a.added_at, a.id)
        )
        return [dict(row) for row in rows.mappings()]

    async def _stored(self, query: Any) -> list[StoredRecording]:
        rows = (await self._conn.execute(query)).mappings().all()
        return [m.stored_recording_from_row(row) for row in rows]

    async def expired_records(
        self, cutoff: datetime, consultation_id: ConsultationId | None = None
    ) -> list[ClosedRecord]:
        """Consultations closed before `cutoff` and not on hold."""
        c = consultations.c
        query = (
            select(c.id, c.status, c.updated_at)
            .where(
                c.status.in_(sorted(s.value for s in CLOSED)),
                c.updated_at < cutoff,
                _not_held(c.id),
            )
            .order_by(c.updated_at, c.id)
        )
        if consultation_id is not None:
            query = query.where(c.id == consultation_id)
        rows = (await self._conn.execute(query)).mappings().all()
        return [ClosedRecord(ConsultationId(r["id"]), r["status"], r["updated_at"]) for r in rows]

    def _expired_audit(
        self, access_cutoff: datetime, record_cutoff: datetime
    ) -> ColumnElement[bool]:
        """Access entries past the access-log period; other entries past the record period
        whose record is gone; never destruction entries; never while on hold."""
        a = audit_log.c
        return (
            a.action.not_in(_NEVER)
            & or_(
                a.action.in_(_ACCESS) & (a.at < access_cutoff),
                a.action.not_in(_ACCESS) & (a.at < record_cutoff) & _record_gone(a.consultation_id),
            )
            & or_(a.consultation_id.is_(None), _not_held(a.consultation_id))
        )

    async def consultations_with_expired_audit(
        self, access_cutoff: datetime, record_cutoff: datetime
    ) -> list[ConsultationId | None]:
        """Each consultation (None: entries of none) with audit entries to purge."""
        a = audit_log.c
        rows = await self._conn.execute(
            select(a.consultation_id)
            .where(self._expired_audit(access_cutoff, record_cutoff))
            .group_by(a.consultation_id)
        )
        found = sorted(rows.scalars(), key=lambda cid: (cid is not None, cid or ""))
        return [ConsultationId(cid) if cid is not None else None for cid in found]

    async def expired_audit(
        self,
        consultation_id: ConsultationId | None,
        access_cutoff: datetime,
        record_cutoff: datetime,
    ) -> PurgedAudit | None:
        """What purge_audit() would delete for this consultation, without deleting it."""
        a = audit_log.c
        rows = await self._conn.execute(
            select(a.action, func.count(), func.min(a.id), func.max(a.id))
            .where(self._of(consultation_id), self._expired_audit(access_cutoff, record_cutoff))
            .group_by(a.action)
            .order_by(a.action)
        )
        found = rows.all()
        if not found:
            return None
        return PurgedAudit(
            count=sum(n for _, n, _, _ in found),
            first_seq=min(lo for _, _, lo, _ in found),
            last_seq=max(hi for _, _, _, hi in found),
            actions={action: n for action, n, _, _ in found},
        )

    @staticmethod
    def _of(consultation_id: ConsultationId | None) -> ColumnElement[bool]:
        a = audit_log.c
        if consultation_id is None:
            return a.consultation_id.is_(None)
        return a.consultation_id == consultation_id

    async def lock(self, consultation_id: ConsultationId) -> bool:
        """Locks the consultation's row (PostgreSQL; SQLite's writer lock is already held) so
        a hold placed meanwhile waits for this transaction; False if there is no such row."""
        found = await self._conn.scalar(
            select(true()).where(consultations.c.id == consultation_id).with_for_update()
        )
        return bool(found)

    # -- the deletes ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _destroying(self) -> AsyncIterator[None]:
        """Lets the append-only triggers pass this transaction's deletes (see the module)."""
        await self._conn.execute(insert(retention_marker).values(id=1))
        try:
            yield
        finally:
            await self._conn.execute(delete(retention_marker))

    async def delete_recording(self, recording_id: RecordingId) -> None:
        await self._conn.execute(delete(recordings).where(recordings.c.id == recording_id))

    async def delete_record(self, consultation_id: ConsultationId) -> DestroyedRecord:
        """Every row of the consultation's record (its audit entries stay: they have their own
        period) and its event chain's head; how many rows of each table went."""
        session_ids = select(sessions.c.id).where(sessions.c.consultation_id == consultation_id)
        by_session = (session_events, participations, recordings)
        by_consultation = (
            # Before sessions: an attachment names the session it was added in.
            attachments,
            consents,
            opinion_signatures,
            opinion_versions,
            final_decisions,
            team_members,
            sessions,
        )
        counts: dict[str, int] = {}
        event_chain = chain.event_chain(consultation_id)
        head = await chain.read_head(self._conn, event_chain)
        async with self._destroying():
            # Children before parents: the foreign keys are checked on both backends.
            for table in by_session:
                result = await self._conn.execute(
                    delete(table).where(table.c.session_id.in_(session_ids))
                )
                counts[table.name] = result.rowcount
        for table in by_consultation:
            result = await self._conn.execute(
                delete(table).where(table.c.consultation_id == consultation_id)
            )
            counts[table.name] = result.rowcount
        result = await self._conn.execute(
            delete(consultations).where(consultations.c.id == consultation_id)
        )
        counts[consultations.name] = result.rowcount
        await self._conn.execute(delete(chain_heads).where(chain_heads.c.chain == event_chain))
        return DestroyedRecord(
            {name: n for name, n in counts.items() if n}, head[0] if head is not None else None
        )

    async def purge_audit(
        self,
        consultation_id: ConsultationId | None,
        access_cutoff: datetime,
        record_cutoff: datetime,
    ) -> PurgedAudit | None:
        """Deletes the expired audit entries of one consultation (None: of none); what went."""
        purged = await self.expired_audit(consultation_id, access_cutoff, record_cutoff)
        if purged is None:
            return None
        a = audit_log.c
        which = (
            self._of(consultation_id),
            self._expired_audit(access_cutoff, record_cutoff),
            a.id <= purged.last_seq,
        )
        doomed = await self._conn.execute(
            select(a.id, a.prev_hash, a.hash).where(*which).order_by(a.id)
        )
        runs = chain.runs_of(doomed.mappings())
        async with self._destroying():
            await self._conn.execute(delete(audit_log).where(*which))
        return replace(purged, runs=tuple(runs))
