"""`telemed retention run`: destroys what has outlived its retention period and is not on legal
hold, and writes a `destroy` entry to the audit log for every destruction, saying what and why.

Three passes, each one transaction per consultation, so a crash leaves every record either
whole or gone, and a second run finishes what the first began:
1. records of consultations closed longer than the record period, with their recording files;
2. recording files (and rows) older than the recording period, of records that stay;
3. audit entries past their period (server/db/retention.py says which).
A dry run reports the same destructions, except that of a record it would destroy it counts
only the access entries (the record's other entries expire once the record is gone).

A recording's file is deleted before its row, inside the transaction that deletes the row: if
the commit never comes, the row is still there and the next run finds the file gone and
deletes the row; the other order could leave a file that nothing points to any more.

Each consultation's row is locked before its hold is checked, and placing a hold locks the
same row, so a hold placed during a run either waits for it or is seen by it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rooms.model import AuditAction, ConsultationId
from rooms.retention import RETENTION_ACTOR, RetentionPeriods
from rooms.roles import Role
from rooms.store import NewAuditEntry, StoredRecording
from server.db.retention import RetentionRepository
from server.db.store import SqlRecordRepository, SqlRecordStore


class RetentionError(Exception):
    pass


@dataclass(frozen=True)
class Destruction:
    what: str  # "record", "recording" or "audit_entries"
    consultation_id: ConsultationId | None
    target: str
    reason: str
    detail: dict[str, Any]

    def describe(self) -> str:
        where = f" of {self.consultation_id}" if self.consultation_id else ""
        return f"{self.what} {self.target}{where}: {self.reason}"


@dataclass
class RetentionReport:
    now: datetime
    dry_run: bool
    cutoffs: dict[str, datetime]
    destroyed: list[Destruction] = field(default_factory=list)


@dataclass(frozen=True)
class _Tx:
    repo: SqlRecordRepository
    retention: RetentionRepository


async def run_retention(
    store: SqlRecordStore,
    periods: RetentionPeriods,
    data_dir: Path,
    now: datetime,
    *,
    dry_run: bool = False,
) -> RetentionReport:
    return await _Run(store, periods, data_dir, now, dry_run).run()


class _Run:
    def __init__(
        self,
        store: SqlRecordStore,
        periods: RetentionPeriods,
        data_dir: Path,
        now: datetime,
        dry_run: bool,
    ) -> None:
        if now.tzinfo is None or now.utcoffset() is None:
            raise RetentionError(f"'now' must carry a time zone, not {now.isoformat()}")
        self.store = store
        self.periods = periods
        self.data_dir = data_dir.resolve()
        self.now = now
        self.dry_run = dry_run
        self.record_cutoff = periods.records.before(now)
        self.recording_cutoff = periods.recordings.before(now)
        self.access_cutoff = periods.access_logs.before(now)
        self.report = RetentionReport(
            now,
            dry_run,
            {
                "records": self.record_cutoff,
                "recordings": self.recording_cutoff,
                "access_logs": self.access_cutoff,
            },
        )

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[_Tx]:
        # A dry run reads in a read-only transaction: it cannot change anything.
        opened = self.store.reading() if self.dry_run else self.store.transaction()
        async with opened as repo:
            yield _Tx(repo, RetentionRepository(repo.connection))

    async def run(self) -> RetentionReport:
        async with self._tx() as tx:
            records = await tx.retention.expired_records(self.record_cutoff)
        gone = set()
        for record in records:
            if await self._destroy_record(record.consultation_id):
                gone.add(record.consultation_id)
        async with self._tx() as tx:
            old = await tx.retention.expired_recordings(self.recording_cutoff)
        # (A dry run still sees the recordings of records it would have destroyed.)
        for cid in sorted({r.consultation_id for r in old} - gone):
            await self._destroy_recordings(cid)
        async with self._tx() as tx:
            with_audit = await tx.retention.consultations_with_expired_audit(
                self.access_cutoff, self.record_cutoff
            )
        for maybe_cid in with_audit:
            await self._purge_audit(maybe_cid)
        return self.report

    # -- the three kinds of destruction ------------------------------------------------------

    async def _destroy_record(self, cid: ConsultationId) -> bool:
        async with self._tx() as tx:
            if not self.dry_run:
                await tx.retention.lock(cid)
            # Again under the lock: a hold may have come since the list was read.
            found = await tx.retention.expired_records(self.record_cutoff, cid)
            if not found:
                return False
            record = found[0]
            files = [await self._remove(r) for r in await tx.retention.recordings_of(cid)]
            attached = [
                await self._remove_attachment(a)
                for a in await tx.retention.attachment_files_of(cid)
            ]
            detail: dict[str, Any] = {"rows": {}}
            if not self.dry_run:
                destroyed = await tx.retention.delete_record(cid)
                detail = {"rows": destroyed.rows, "event_chain_head": destroyed.event_chain_head}
            reason = (
                f"the record period ({self.periods.records}) has passed since the consultation "
                f"was {record.status} on {record.closed_at.date().isoformat()}"
            )
            await self._destroyed(
                tx,
                Destruction(
                    "record",
                    cid,
                    "record",
                    reason,
                    detail | {"recordings": files, "attachments": attached},
                ),
            )
        return True

    async def _destroy_recordings(self, cid: ConsultationId) -> None:
        async with self._tx() as tx:
            if not self.dry_run:
                await tx.retention.lock(cid)
            for stored in await tx.retention.expired_recordings(self.recording_cutoff, cid):
                r = stored.recording
                removed = await self._remove(stored)
                if not self.dry_run:
                    await tx.retention.delete_recording(r.id)
                ended = (r.ended_at or r.started_at).date().isoformat()
                reason = (
                    f"the recording period ({self.periods.recordings}) has passed since the "
                    f"recording ended on {ended}"
                )
                await self._destroyed(tx, Destruction("recording", cid, r.id, reason, removed))

    async def _purge_audit(self, cid: ConsultationId | None) -> None:
        async with self._tx() as tx:
            if cid is not None and not self.dry_run:
                await tx.retention.lock(cid)
            args = (cid, self.access_cutoff, self.record_cutoff)
            if self.dry_run:
                purged = await tx.retention.expired_audit(*args)
            else:
                purged = await tx.retention.purge_audit(*args)
            if purged is None:
                return
            reason = (
                f"access entries older than the access-log period ({self.periods.access_logs}); "
                f"entries of destroyed records older than the record period "
                f"({self.periods.records})"
            )
            detail: dict[str, Any] = {
                "count": purged.count,
                "first_seq": purged.first_seq,
                "last_seq": purged.last_seq,
                "actions": purged.actions,
            }
            if purged.runs:
                # What verification needs to tell these gaps in the audit chain from tampering.
                detail["chain_runs"] = [run.as_json() for run in purged.runs]
            await self._destroyed(
                tx, Destruction("audit_entries", cid, "audit_log", reason, detail)
            )

    # -- helpers -------------------------------------------------------------------------------

    async def _destroyed(self, tx: _Tx, destruction: Destruction) -> None:
        self.report.destroyed.append(destruction)
        if self.dry_run:
            return
        await tx.repo.append_audit(
            NewAuditEntry(
                at=self.now,
                actor=RETENTION_ACTOR,
                actor_role=Role.ADMIN,
                action=AuditAction.DESTROY,
                consultation_id=destruction.consultation_id,
                target=destruction.target,
                remote_addr=None,
                detail={"what": destruction.what, "reason": destruction.reason}
                | destruction.detail,
            )
        )

    async def _remove_attachment(self, row: dict[str, Any]) -> dict[str, Any]:
        """Deletes an attachment's file (not in a dry run), as _remove does a recording's."""
        kept = {k: row[k] for k in ("id", "media_type", "sha256", "size_bytes")}
        return kept | {"file": await self._delete_file(f"attachment {row['id']}", row["path"])}

    async def _remove(self, stored: StoredRecording) -> dict[str, Any]:
        """Deletes a recording's file (not in a dry run); what the destruction entry keeps of
        the recording (never the path: it is not shown outside the server)."""
        r = stored.recording
        kept: dict[str, Any] = {
            "recording": r.id,
            "track": r.track,
            "kind": r.kind,
            "media_type": r.media_type,
            "sha256": r.sha256,
            "size_bytes": r.size_bytes,
            "duration_s": r.duration_s,
        }
        if stored.path is None:
            return kept | {"file": "none"}
        return kept | {"file": await self._delete_file(f"recording {r.id}", stored.path)}

    async def _delete_file(self, what: str, relative: str) -> str:
        """Deletes one file of the record under the data directory (not in a dry run); what
        became of it, for the destruction entry."""
        path = (self.data_dir / relative).resolve()
        if not path.is_relative_to(self.data_dir):
            raise RetentionError(f"{what}: its file is outside the data directory; not deleted")
        if self.dry_run:
            exists = await asyncio.to_thread(path.exists)
            return "present" if exists else "missing"
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            # Deleted by an earlier run that died before its commit.
            return "already gone"
        return "deleted"
