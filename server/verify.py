"""Verification of one consultation's record (`telemed verify`, GET .../verify): its event
chain, the audit chain, every opinion signature, every recording's and attachment's file
SHA-256.

Everything is read in one snapshot. A mismatch names the row (seq), opinion version and
signer, or recording, and what was expected against what was found. The audit chain is
global, so its problems are reported whichever consultation is verified (each names the
consultation of its entry)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from media.sealed import SealError, SealKeys, plaintext_sha256
from rooms import opinion
from rooms.model import Consultation, ConsultationId, RecordingState, SignatureCheck
from rooms.retention import UNFINISHED_RECORDING_STATES
from rooms.store import StoredAttachment, StoredRecording
from server.db import chain
from server.db.store import SqlRecordRepository, SqlRecordStore


@dataclass(frozen=True)
class Mismatch:
    check: str  # event_chain, audit_chain, opinion, recording_file, attachment_file
    where: str
    problem: str
    expected: str | None = None
    found: str | None = None
    consultation_id: str | None = None


@dataclass
class VerifyReport:
    consultation_id: ConsultationId
    # How many of each were checked.
    checked: dict[str, int] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    # Not mismatches, but not proof either: signatures made before signatures were keyed.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_json(self) -> dict[str, Any]:
        return {
            "consultation_id": self.consultation_id,
            "ok": self.ok,
            "checked": self.checked,
            "mismatches": [asdict(m) for m in self.mismatches],
            "notes": self.notes,
        }


async def verify_consultation(
    store: SqlRecordStore,
    signer: opinion.OpinionSigner,
    data_dir: Path,
    keys: SealKeys,
    consultation_id: ConsultationId,
) -> VerifyReport | None:
    """The report, or None if there is no such consultation."""
    async with store.snapshot() as tx:
        consultation = await tx.get_consultation(consultation_id)
        if consultation is None:
            return None
        report = VerifyReport(consultation_id)
        await _chains(tx, report)
        await _opinions(tx, signer, consultation, report)
        stored = [
            r
            for s in await tx.list_sessions(consultation_id)
            for r in await tx.list_stored_recordings(session_id=s.id)
        ]
        attached = [
            found
            for a in await tx.list_attachments(consultation_id)
            if (found := await tx.get_attachment(a.id)) is not None
        ]
    await asyncio.to_thread(_recordings, stored, data_dir, keys, report)
    await asyncio.to_thread(_attachments, attached, data_dir, keys, report)
    return report


async def _chains(tx: SqlRecordRepository, report: VerifyReport) -> None:
    conn = tx.connection
    events = await chain.verify_events(conn, report.consultation_id)
    audit = await chain.verify_audit(conn)
    report.checked["events"] = len(await tx.list_events(report.consultation_id))
    report.checked["audit_entries"] = await chain.count_audit(conn)
    for check, problems in (("event_chain", events), ("audit_chain", audit)):
        for p in problems:
            where = "chain head" if p.seq == 0 else f"seq {p.seq}"
            report.mismatches.append(
                Mismatch(check, where, p.problem, p.expected, p.found, p.consultation_id)
            )


async def _opinions(
    tx: SqlRecordRepository,
    signer: opinion.OpinionSigner,
    consultation: Consultation,
    report: VerifyReport,
) -> None:
    versions = opinion.verified(signer, await tx.list_opinion_versions(consultation.id))
    report.checked["opinion_versions"] = len(versions)
    report.checked["signatures"] = sum(len(v.signatures) for v in versions)
    for v in versions:
        computed = opinion.content_hash(consultation, v.version, v.content, v.amendment_reason)
        if computed != v.content_hash:
            report.mismatches.append(
                Mismatch(
                    "opinion",
                    f"version {v.version}",
                    "the content does not match its content hash",
                    v.content_hash,
                    computed,
                    consultation.id,
                )
            )
        for s in v.signatures:
            where = f"version {v.version}, signed by {s.signer}"
            if s.check is SignatureCheck.UNSIGNED:
                report.notes.append(f"{where}: made before signatures were keyed (hash only)")
            elif s.check is SignatureCheck.UNKNOWN_KEY:
                report.mismatches.append(
                    Mismatch(
                        "opinion",
                        where,
                        "signed with a key this server does not know (add the old public key "
                        "to TELEMED_SIGNING_PREVIOUS_PUBLIC_KEYS)",
                        s.key_id,
                        None,
                        consultation.id,
                    )
                )
            elif s.check is not SignatureCheck.VALID:
                report.mismatches.append(
                    Mismatch(
                        "opinion",
                        where,
                        "the signature does not verify: the version, the signer, the time, the "
                        "previous version or the signature changed",
                        "a valid Ed25519 signature",
                        s.value,
                        consultation.id,
                    )
                )


def _recordings(
    stored: list[StoredRecording], data_dir: Path, keys: SealKeys, report: VerifyReport
) -> None:
    """Blocking (reads every file): run in a thread."""
    data_dir = data_dir.resolve()
    checked = 0
    for item in stored:
        r = item.recording
        # Still being written or rendered: no hash yet.
        if r.state in UNFINISHED_RECORDING_STATES or item.path is None:
            continue
        checked += 1
        mismatch = _check_file(data_dir, keys, item)
        if mismatch is not None:
            report.mismatches.append(mismatch)
    report.checked["recording_files"] = checked


def _attachments(
    stored: list[StoredAttachment], data_dir: Path, keys: SealKeys, report: VerifyReport
) -> None:
    """Blocking (reads every file): run in a thread."""
    data_dir = data_dir.resolve()
    for item in stored:
        a = item.attachment
        where = f"attachment {a.id}"
        path = (data_dir / item.path).resolve()
        if not path.is_relative_to(data_dir):
            report.mismatches.append(
                Mismatch("attachment_file", where, "its path leaves the data directory")
            )
            continue
        try:
            digest, _ = plaintext_sha256(path, keys)
        except FileNotFoundError:
            problem, digest = "the file is missing", None
        except SealError as exc:
            problem, digest = f"the file fails its seal: {exc}", None
        else:
            problem = "the file's SHA-256 is not the one in the record"
        if digest != a.sha256:
            report.mismatches.append(
                Mismatch("attachment_file", where, problem, a.sha256, digest, a.consultation_id)
            )
    report.checked["attachment_files"] = len(stored)


def _check_file(data_dir: Path, keys: SealKeys, item: StoredRecording) -> Mismatch | None:
    r, cid = item.recording, item.consultation_id
    where = f"recording {r.id}"
    assert item.path is not None
    path = (data_dir / item.path).resolve()
    if r.sha256 is None:
        return Mismatch("recording_file", where, f"{r.state}, but no SHA-256 in the record")
    if not path.is_relative_to(data_dir):
        return Mismatch("recording_file", where, "its path leaves the data directory")
    try:
        # The one function that hashes a recording file: what was recorded, decrypted from
        # its seal, every chunk authenticated on the way.
        unfinished = r.state == RecordingState.INTERRUPTED.value
        digest, _ = plaintext_sha256(path, keys, unfinished_ok=unfinished)
    except FileNotFoundError:
        return Mismatch("recording_file", where, "the file is missing", r.sha256, None, cid)
    except SealError as exc:
        return Mismatch(
            "recording_file", where, f"the file fails its seal: {exc}", r.sha256, None, cid
        )
    if digest != r.sha256:
        return Mismatch(
            "recording_file",
            where,
            "the file's SHA-256 is not the one in the record",
            r.sha256,
            digest,
            cid,
        )
    return None
