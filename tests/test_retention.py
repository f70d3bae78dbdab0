"""Retention: periods from the configuration, legal holds over the API, and `telemed retention
run` destroying what expired (never what is on hold) with a destruction entry for each, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from api_helpers import ADMIN, COUNTY, VILLAGE, Api, assert_problem, error_paths, one
from db_fixtures import TestDatabase

import server
from rooms.model import (
    AuditAction,
    AuditEntry,
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    Recording,
    RecordingId,
    Resident,
    Session,
    SessionId,
    Sex,
    TeamMember,
    UserId,
)
from rooms.retention import LegalHold, Period, RetentionPeriods
from rooms.roles import Role
from rooms.store import NewAuditEntry
from server.app import STORE
from server.config import ConfigError, load_config
from server.db.migrate import upgrade
from server.db.retention import DestroyedRecord, RetentionRepository
from server.db.store import SqlRecordStore
from server.retention import RetentionError, run_retention

pytest_plugins = ["db_fixtures"]

DEFAULT = RetentionPeriods(Period(15), Period(3), Period(0, 6))
NOW = datetime(2041, 1, 1, tzinfo=UTC)
# Far enough ahead that a consultation closed today has expired.
LATER = datetime(2060, 1, 1, tzinfo=UTC)


def t(year: int, month: int = 1, day: int = 1) -> datetime:
    return datetime(year, month, day, 8, 0, tzinfo=UTC)


# -- periods and configuration ---------------------------------------------------------------


def test_periods_count_calendar_years_and_months() -> None:
    assert Period.parse("15y").before(t(2040, 2, 29)) == t(2025, 2, 28)
    assert Period.parse("6 months").before(t(2025, 8, 31)) == t(2025, 2, 28)
    assert Period.parse("1y 6mo").before(t(2026, 7, 1)) == t(2025, 1, 1)
    assert Period.parse("180d").before(t(2025, 7, 1)) == t(2025, 1, 2)
    assert str(Period.parse("1 year 6mo 1d")) == "1 year 6 months 1 day"
    for bad in ("", "15", "6m", "15y and more", "0y"):
        with pytest.raises(ValueError, match="period"):
            Period.parse(bad)


def test_periods_from_config_file_and_environment(tmp_path: Path) -> None:
    assert load_config(env={}).retention.periods == DEFAULT
    file = tmp_path / "telemed.toml"
    file.write_text('[retention]\nrecords = "30 years"\nrecordings = "5y"\n', encoding="utf-8")
    from_file = load_config(file, env={}).retention.periods
    assert from_file == RetentionPeriods(Period(30), Period(5), Period(0, 6))
    env = {"TELEMED_RETENTION_ACCESS_LOGS": "1y", "TELEMED_RETENTION_RECORDS": "16y"}
    from_env = load_config(file, env=env).retention.periods
    assert from_env == RetentionPeriods(Period(16), Period(5), Period(1))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RECORDS", "10y", "retention.records.*shorter than the legal minimum of 15 years"),
        ("RECORDINGS", "2y 11mo", "retention.recordings.*minimum of 3 years"),
        ("ACCESS_LOGS", "90d", "retention.access_logs.*minimum of 6 months for access logs"),
        ("ACCESS_LOGS", "6 weeks", "retention.access_logs.*is not a period"),
        ("RECORDS", "forever", "retention.records.*is not a period"),
    ],
)
def test_bad_periods_are_refused_naming_the_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"(?s){message}"):
        load_config(env={f"TELEMED_RETENTION_{name}": value})


# -- a store full of records of every age -------------------------------------------------------


def consultation(cid: str, status: ConsultationStatus, closed: datetime) -> Consultation:
    return Consultation(
        id=ConsultationId(cid),
        kind=ConsultationKind.CONSULTATION,
        specialty="respiratory",
        resident=Resident(f"r-{cid}", "刘奶奶", 72, Sex.FEMALE),
        inviting_institution="莲花村卫生室",
        inviting_clinician=UserId("u-village"),
        reason="咳嗽",
        purpose="诊断",
        case_summary="",
        requested_specialty="respiratory",
        requested_title="主任医师",
        preferred_time=None,
        scheduled_time=None,
        status=status,
        status_reason=None,
        created_at=closed,
        updated_at=closed,
        team=[
            TeamMember(UserId("u-village"), "王村医", Role.VILLAGE_DOCTOR, "莲花村卫生室", closed)
        ],
    )


def recording(rid: str, sid: str, ended: datetime, state: str = "complete") -> Recording:
    return Recording(
        RecordingId(rid), SessionId(sid), "p1-camera", "track", "video/webm", "ab" * 32,
        60.0, 4, state, ended, ended if state == "complete" else None,
    )  # fmt: skip


def entry(cid: str | None, action: AuditAction, at: datetime) -> NewAuditEntry:
    return NewAuditEntry(
        at, UserId("u-village"), Role.VILLAGE_DOCTOR, action,
        ConsultationId(cid) if cid else None, None, "10.0.0.1", {},
    )  # fmt: skip


@dataclass
class World:
    store: SqlRecordStore
    data_dir: Path

    def file(self, rid: str) -> Path:
        return self.data_dir / "recordings" / f"{rid}.webm"

    async def audit(self) -> list[AuditEntry]:
        async with self.store.reading() as tx:
            return await tx.list_audit(None, 10_000, 0)

    async def exists(self, cid: str) -> bool:
        async with self.store.reading() as tx:
            return await tx.get_consultation(ConsultationId(cid)) is not None

    async def recording_ids(self, cid: str) -> list[str]:
        async with self.store.reading() as tx:
            return [r.id for r in await tx.list_recordings(ConsultationId(cid))]


async def build_world(store: SqlRecordStore, data_dir: Path) -> World:
    """Seen from NOW (2041-01-01) with the default periods:
    - old: archived in 2025 (16 years ago): its whole record expired;
    - held: the same, but on legal hold;
    - recent: archived in 2030: the record stays, its 2030 recording expired, one still
      marked as recording (never expired);
    - new: signed in December 2040: everything stays."""
    world = World(store, data_dir)
    (data_dir / "recordings").mkdir(parents=True)
    async with store.transaction() as tx:
        for cid, status, closed in (
            ("old", ConsultationStatus.ARCHIVED, t(2025)),
            ("held", ConsultationStatus.ARCHIVED, t(2025)),
            ("recent", ConsultationStatus.ARCHIVED, t(2030)),
            ("new", ConsultationStatus.SIGNED, t(2040, 12)),
        ):
            await tx.add_consultation(consultation(cid, status, closed))
            sid = SessionId(f"s-{cid}")
            await tx.add_session(Session(sid, ConsultationId(cid), 1, closed, closed))
            rid = f"rec-{cid}"
            world.file(rid).write_bytes(b"webm")
            await tx.add_recording(recording(rid, sid, closed), path=f"recordings/{rid}.webm")
            await tx.append_audit(entry(cid, AuditAction.CREATE_CONSULTATION, closed))
            await tx.append_audit(entry(cid, AuditAction.VIEW_RECORD, closed))
        await tx.add_recording(
            recording("rec-stuck", "s-recent", t(2030), state="recording"),
            path="recordings/rec-stuck.webm",
        )
        world.file("rec-stuck").write_bytes(b"webm")
        await tx.place_legal_hold(
            LegalHold(ConsultationId("held"), "litigation 2040-17", UserId("u-admin"), t(2040))
        )
        await tx.append_audit(entry(None, AuditAction.VIEW_AUDIT, t(2030)))
        await tx.append_audit(entry(None, AuditAction.VIEW_AUDIT, t(2040, 12)))
        # A destruction logged long ago: the destruction log is never purged.
        await tx.append_audit(entry("gone", AuditAction.DESTROY, t(2001)))
    return world


@pytest.fixture
async def world(sql_store: SqlRecordStore, tmp_path: Path) -> World:
    return await build_world(sql_store, tmp_path / "data")


def destroyed_entries(entries: list[AuditEntry]) -> list[AuditEntry]:
    return [e for e in entries if e.action is AuditAction.DESTROY and e.consultation_id != "gone"]


# -- the run ------------------------------------------------------------------------------------


async def test_a_dry_run_reports_and_changes_nothing(world: World) -> None:
    before = await world.audit()
    report = await run_retention(world.store, DEFAULT, world.data_dir, NOW, dry_run=True)
    assert [(d.what, d.consultation_id, d.target) for d in report.destroyed] == [
        ("record", "old", "record"),
        ("recording", "recent", "rec-recent"),
        ("audit_entries", None, "audit_log"),
        ("audit_entries", "old", "audit_log"),
        ("audit_entries", "recent", "audit_log"),
    ]
    assert report.destroyed[0].detail["recordings"][0]["file"] == "present"
    # The old record still stands in a dry run: only its access entry counts as expired.
    assert report.destroyed[3].detail["actions"] == {"view_record": 1}
    assert await world.audit() == before
    assert await world.exists("old")
    assert all(world.file(f"rec-{c}").exists() for c in ("old", "held", "recent", "new"))


async def test_a_run_destroys_what_expired_and_logs_why(world: World) -> None:
    report = await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    assert [(d.what, d.consultation_id, d.target) for d in report.destroyed] == [
        ("record", "old", "record"),
        ("recording", "recent", "rec-recent"),
        # The old record's own entries go with the record's period, now that it is gone.
        ("audit_entries", None, "audit_log"),
        ("audit_entries", "old", "audit_log"),
        ("audit_entries", "recent", "audit_log"),
    ]

    # The old record is gone, rows and file; its audit trail keeps only the destruction log.
    assert not await world.exists("old")
    assert not world.file("rec-old").exists()
    async with world.store.reading() as tx:
        assert await tx.list_sessions(ConsultationId("old")) == []
        old_trail = await tx.list_audit(ConsultationId("old"), 100, 0)
    assert [e.action for e in old_trail] == [AuditAction.DESTROY, AuditAction.DESTROY]
    record_entry, purge_entry = old_trail
    assert record_entry.target == "record" and record_entry.actor == "telemed-retention"
    assert "record period (15 years) has passed" in record_entry.detail["reason"]
    assert "archived on 2025-01-01" in record_entry.detail["reason"]
    assert record_entry.detail["rows"]["consultations"] == 1
    assert record_entry.detail["rows"]["recordings"] == 1
    (gone,) = record_entry.detail["recordings"]
    assert (gone["recording"], gone["sha256"], gone["file"]) == ("rec-old", "ab" * 32, "deleted")
    assert "path" not in gone and "recordings/" not in str(record_entry.detail)
    assert purge_entry.detail["count"] == 2
    assert purge_entry.detail["actions"] == {"create_consultation": 1, "view_record": 1}

    # On hold: everything stays.
    assert await world.exists("held") and world.file("rec-held").exists()
    assert await world.recording_ids("held") == ["rec-held"]
    async with world.store.reading() as tx:
        held_trail = await tx.list_audit(ConsultationId("held"), 100, 0)
    assert [e.action for e in held_trail] == [
        AuditAction.CREATE_CONSULTATION,
        AuditAction.VIEW_RECORD,
    ]

    # The recent record stays; its expired recording went, the one still recording did not;
    # its access entry went, its activity entry stays with the record.
    assert await world.exists("recent")
    assert await world.recording_ids("recent") == ["rec-stuck"]
    assert not world.file("rec-recent").exists() and world.file("rec-stuck").exists()
    async with world.store.reading() as tx:
        recent_trail = await tx.list_audit(ConsultationId("recent"), 100, 0)
    assert [(e.action, e.target) for e in recent_trail] == [
        (AuditAction.CREATE_CONSULTATION, None),
        (AuditAction.DESTROY, "rec-recent"),
        (AuditAction.DESTROY, "audit_log"),
    ]
    assert "recording period (3 years) has passed" in recent_trail[1].detail["reason"]
    assert recent_trail[1].detail["file"] == "deleted"

    # New: untouched. Audit entries of no consultation: only the expired one went.
    assert await world.recording_ids("new") == ["rec-new"] and world.file("rec-new").exists()
    entries = await world.audit()
    unscoped = [(e.action, e.at) for e in entries if e.consultation_id is None]
    assert unscoped == [(AuditAction.VIEW_AUDIT, t(2040, 12)), (AuditAction.DESTROY, NOW)]
    assert any(e.consultation_id == "gone" for e in entries)  # never purged
    assert len(destroyed_entries(entries)) == len(report.destroyed)


async def test_a_second_run_does_nothing(world: World) -> None:
    await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    after_first = await world.audit()
    again = await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    assert again.destroyed == []
    assert await world.audit() == after_first


async def test_releasing_the_hold_lets_the_next_run_destroy(world: World) -> None:
    await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    async with world.store.transaction() as tx:
        await tx.release_legal_hold(ConsultationId("held"), UserId("u-admin"), t(2040, 6), "done")
    report = await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    assert [(d.what, d.consultation_id) for d in report.destroyed] == [
        ("record", "held"),
        ("audit_entries", "held"),
    ]
    assert not await world.exists("held") and not world.file("rec-held").exists()


async def test_a_crash_inside_a_record_leaves_it_whole_and_the_next_run_finishes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RetentionRepository.delete_record

    async def dies_half_way(self: RetentionRepository, cid: ConsultationId) -> DestroyedRecord:
        await real(self, cid)  # every row deleted, then the process "dies" before commit
        raise RuntimeError("killed")

    monkeypatch.setattr(RetentionRepository, "delete_record", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    # Rolled back: the record is whole (only the file, deleted first, is gone).
    assert await world.exists("old")
    assert await world.recording_ids("old") == ["rec-old"]
    assert not world.file("rec-old").exists()
    assert destroyed_entries(await world.audit()) == []

    monkeypatch.setattr(RetentionRepository, "delete_record", real)
    report = await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    assert report.destroyed[0].what == "record"
    assert report.destroyed[0].detail["recordings"][0]["file"] == "already gone"
    assert not await world.exists("old")


async def test_files_outside_the_data_directory_are_refused(world: World) -> None:
    async with world.store.transaction() as tx:
        await tx.add_recording(recording("rec-escape", "s-new", t(2030)), path="../escape.webm")
    with pytest.raises(RetentionError, match="rec-escape: its file is outside the data dir"):
        await run_retention(world.store, DEFAULT, world.data_dir, NOW)
    # Its consultation's transaction rolled back; the run stopped before touching more.
    assert await world.recording_ids("new") == ["rec-escape", "rec-new"]


async def test_now_must_carry_a_time_zone(sql_store: SqlRecordStore, tmp_path: Path) -> None:
    with pytest.raises(RetentionError, match="time zone"):
        await run_retention(sql_store, DEFAULT, tmp_path, datetime(2041, 1, 1))


# -- the command ---------------------------------------------------------------------------------


TELEMED = Path(sys.executable).parent / "telemed"


async def telemed(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it, with only our TELEMED_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    clean |= {"TELEMED_DATA_DIR": str(data), **env}
    return await asyncio.to_thread(
        subprocess.run,
        [str(TELEMED), *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"sqlite+aiosqlite:///{data / 'telemed.db'}"
    await upgrade(url)
    store = SqlRecordStore(url)
    await store.start()
    try:
        await build_world(store, data)
    finally:
        await store.stop()
    now = "2041-01-01T08:00:00+08:00"
    dry = await telemed(data, "retention", "run", "--dry-run", "--now", now)
    assert dry.returncode == 0, dry.stderr
    assert "would destroy record record of old: the record period (15 years)" in dry.stdout
    assert "would destroy recording rec-recent of recent" in dry.stdout
    assert dry.stdout.rstrip().endswith("5 to destroy")
    assert (data / "recordings" / "rec-old.webm").exists()

    run = await telemed(data, "retention", "run", "--now", now)
    assert run.returncode == 0, run.stderr
    assert "records: expired if before 2026-01-01T08:00:00+08:00" in run.stdout
    assert run.stdout.rstrip().endswith("5 destroyed")
    assert not (data / "recordings" / "rec-old.webm").exists()
    again = await telemed(data, "retention", "run", "--now", now)
    assert again.stdout.rstrip().endswith("0 destroyed")

    naive = await telemed(data, "retention", "run", "--now", "2041-01-01T08:00")
    assert naive.returncode == 2 and "give a time zone" in naive.stderr
    short = await telemed(data, "retention", "run", TELEMED_RETENTION_RECORDINGS="1y")
    assert short.returncode == 2 and "retention.recordings" in short.stderr
    assert "minimum of 3 years" in short.stderr


# -- legal holds over the API ---------------------------------------------------------------------


async def test_legal_hold_over_the_api(backend_api: Api) -> None:
    api = backend_api
    cid = await api.create()
    hold = one(cid, "/legal-hold")
    assert (await api.get(hold, ADMIN)).body == {
        "consultation_id": cid,
        "held": False,
        "reason": None,
        "placed_by": None,
        "placed_at": None,
    }
    placed = await api.request("PUT", hold, ADMIN, json_body={"reason": "诉讼保全 2041-03"})
    assert placed.status == 200, placed
    assert placed.body["held"] is True and placed.body["placed_by"] == ADMIN.user_id
    changed = await api.request("PUT", hold, ADMIN, json_body={"reason": "court order 17"})
    assert changed.body["reason"] == "court order 17"
    assert (await api.get(hold, ADMIN)).body["reason"] == "court order 17"

    released = await api.request("DELETE", hold, ADMIN, json_body={"reason": "case closed"})
    assert released.status == 204, released
    assert (await api.get(hold, ADMIN)).body["held"] is False
    again = await api.request("DELETE", hold, ADMIN, json_body={"reason": "case closed"})
    assert_problem(again, 409, "not on legal hold")

    trail = [e for e in await api.audit(consultation=cid) if "legal_hold" in e["action"]]
    assert [(e["action"], e["actor"], e["detail"]) for e in trail] == [
        ("place_legal_hold", ADMIN.user_id, {"reason": "诉讼保全 2041-03"}),
        ("place_legal_hold", ADMIN.user_id,
         {"reason": "court order 17", "replaces": "诉讼保全 2041-03"}),
        ("release_legal_hold", ADMIN.user_id,
         {"reason": "case closed", "held_for": "court order 17"}),
    ]  # fmt: skip


async def test_who_may_hold_and_what_a_hold_needs(api: Api) -> None:
    cid = await api.create()
    hold = one(cid, "/legal-hold")
    for who in (VILLAGE, COUNTY):
        reply = await api.request("PUT", hold, who, json_body={"reason": "x"})
        assert_problem(reply, 403, "may not manage_retention")
        assert_problem(await api.get(hold, who), 403, "manage_retention")
    assert_problem(await api.request("PUT", hold, None, json_body={"reason": "x"}), 401)
    missing = await api.request(
        "PUT", one("c_nope", "/legal-hold"), ADMIN, json_body={"reason": "x"}
    )
    assert_problem(missing, 404, "c_nope")
    for body in ({}, {"reason": ""}, {"reason": "x", "until": "2042"}):
        reply = await api.request("PUT", hold, ADMIN, json_body=body)
        assert_problem(reply, 400)
        assert error_paths(reply) in (["reason"], ["until"])
    no_reason = await api.request("DELETE", hold, ADMIN, json_body={})
    assert_problem(no_reason, 400, "reason")
    assert error_paths(no_reason) == ["reason"]


async def test_a_hold_placed_over_the_api_stops_the_run(api: Api, tmp_path: Path) -> None:
    cid = await api.create()
    await api.act(cid, "cancel", VILLAGE, {"reason": "家属决定去省医院"})
    reply = await api.request("PUT", one(cid, "/legal-hold"), ADMIN, json_body={"reason": "r"})
    assert reply.status == 200
    store = api.app[STORE]
    report = await run_retention(store, DEFAULT, tmp_path, LATER)
    assert report.destroyed == []
    assert (await api.get(one(cid), VILLAGE)).status == 200
    reply = await api.request("DELETE", one(cid, "/legal-hold"), ADMIN, json_body={"reason": "r"})
    assert reply.status == 204
    report = await run_retention(store, DEFAULT, tmp_path, LATER)
    assert [(d.what, d.consultation_id) for d in report.destroyed][:1] == [("record", cid)]
    assert_problem(await api.get(one(cid), VILLAGE), 404)
    # The destruction is in the audit log the admin reads.
    actions = [e["action"] for e in await api.audit(consultation=cid)]
    assert actions.count("destroy") == 2 and "release_legal_hold" not in actions


# -- the one module that deletes ----------------------------------------------------------------


def test_only_the_retention_run_reaches_the_deleting_module() -> None:
    root = Path(server.__file__).parent.parent
    importers = sorted(
        str(p.relative_to(root))
        for top in ("rooms", "server", "signaling", "media")
        for p in (root / top).rglob("*.py")
        if re.search(r"server\.db\.retention\b|from server\.db import retention", p.read_text())
    )
    assert importers == ["server/retention.py"]


async def test_migrated_db_has_the_holds_table(migrated_db: TestDatabase) -> None:
    store = SqlRecordStore(migrated_db.url, connect_args=migrated_db.connect_args)
    await store.start()
    try:
        async with store.transaction() as tx:
            await tx.add_consultation(consultation("c", ConsultationStatus.ARCHIVED, t(2025)))
            await tx.place_legal_hold(LegalHold(ConsultationId("c"), "r", UserId("a"), t(2030)))
        async with store.reading() as tx:
            found = await tx.get_legal_hold(ConsultationId("c"))
            assert found == LegalHold(ConsultationId("c"), "r", UserId("a"), t(2030))
    finally:
        await store.stop()
