"""SqlRecordStore against real databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import inspect
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from db_fixtures import TestDatabase
from sqlalchemy import Column, Integer, MetaData, Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import OperationalError, StatementError

import server.db
from rooms.errors import Conflict, NotFound
from rooms.model import (
    AuditAction,
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
from rooms.roles import Role
from rooms.store import ConsultationFilter, NewAuditEntry, RecordRepository, StoredRecording
from server.db.engine import make_engine
from server.db.migrate import (
    current_revision,
    downgrade_to_base,
    head_revision,
    upgrade,
    upgrade_sync,
)
from server.db.store import SqlRecordRepository, SqlRecordStore
from server.db.tables import metadata

pytest_plugins = ["db_fixtures"]

# Microseconds on purpose: both backends must keep them.
T0 = datetime(2025, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
CST = timezone(timedelta(hours=8))
ALL_TABLES = {t.name for t in metadata.sorted_tables}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def member(
    user: str, role: Role, institution: str = "County Hospital", minutes: float = 0
) -> TeamMember:
    return TeamMember(UserId(user), f"Dr {user}", role, institution, at(minutes))


def consultation(
    cid: str = "c1",
    *,
    status: ConsultationStatus = ConsultationStatus.REQUESTED,
    institution: str = "Lishan Village Clinic",
    team: list[TeamMember] | None = None,
    created: datetime = T0,
) -> Consultation:
    return Consultation(
        id=ConsultationId(cid),
        kind=ConsultationKind.CONSULTATION,
        specialty="cardiology",
        resident=Resident("r-7f3a", "王大爷", 71, Sex.MALE),
        inviting_institution=institution,
        inviting_clinician=UserId("u-village"),
        reason="chest pain on exertion",
        purpose="second opinion",
        case_summary="ECG attached; BP 160/95",
        requested_specialty="cardiology",
        requested_title="chief physician",
        preferred_time=at(60 * 24),
        scheduled_time=None,
        status=status,
        status_reason=None,
        created_at=created,
        updated_at=created,
        team=list(team or []),
    )


def session(sid: str, cid: str = "c1", number: int = 1, minutes: float = 10) -> Session:
    return Session(SessionId(sid), ConsultationId(cid), number, at(minutes), None)


def participation(sid: str, pid: str, user: str, minutes: float) -> Participation:
    return Participation(
        session_id=SessionId(sid),
        participant_id=ParticipantId(pid),
        user_id=UserId(user),
        name=f"Dr {user}",
        role=Role.COUNTY_PHYSICIAN,
        device="Firefox 140 / Linux",
        joined_at=at(minutes),
        left_at=None,
        close_reason=None,
    )


def opinion(version: int, cid: str = "c1", amendment: str | None = None) -> OpinionVersion:
    return OpinionVersion(
        consultation_id=ConsultationId(cid),
        version=version,
        content=OpinionContent(
            findings=f"findings v{version}",
            assessment="stable angina",
            recommendations="start aspirin 100 mg",
            referral_advice="refer if pain at rest",
        ),
        author=UserId("u-county"),
        created_at=at(100 + version),
        amendment_reason=amendment,
        content_hash=f"{version:064x}",
    )


def signature(version: int, signer: str, minutes: float) -> Signature:
    return Signature(
        version=version,
        signer=UserId(signer),
        signer_name=f"Dr {signer}",
        signer_role=Role.PROVINCIAL_SPECIALIST,
        signed_at=at(minutes),
        content_hash=f"{version:064x}",
    )


def audit(minutes: float, cid: str | None, action: AuditAction) -> NewAuditEntry:
    return NewAuditEntry(
        at=at(minutes),
        actor=UserId("u-admin"),
        actor_role=Role.ADMIN,
        action=action,
        consultation_id=ConsultationId(cid) if cid is not None else None,
        target=f"target-{minutes}",
        remote_addr="10.0.0.7",
        detail={"minutes": minutes, "note": "查看"},
    )


async def add_with_session(store: SqlRecordStore, cid: str = "c1", sid: str = "s1") -> None:
    async with store.transaction() as repo:
        await repo.add_consultation(consultation(cid))
        await repo.add_session(session(sid, cid))


# -- consultations -------------------------------------------------------------------------------


async def test_consultation_round_trip_with_team(sql_store: SqlRecordStore) -> None:
    original = consultation(
        team=[
            member("u-prov", Role.PROVINCIAL_SPECIALIST, "Provincial Hospital", minutes=5),
            member("u-village", Role.VILLAGE_DOCTOR, "Lishan Village Clinic", minutes=1),
        ],
        # Given in China Standard Time; must come back as the same instant in UTC.
        created=T0.astimezone(CST),
    )
    async with sql_store.transaction() as repo:
        await repo.add_consultation(original)

    async with sql_store.transaction() as repo:
        loaded = await repo.get_consultation(ConsultationId("c1"))
        locked = await repo.get_consultation(ConsultationId("c1"), for_update=True)
        missing = await repo.get_consultation(ConsultationId("nope"))

    assert loaded is not None
    # Team in the order members were added (added_at), not insertion order.
    assert [m.user_id for m in loaded.team] == ["u-village", "u-prov"]
    assert loaded == replace(original, team=sorted(original.team, key=lambda m: m.added_at))
    assert loaded.created_at == T0 and loaded.created_at.tzinfo is UTC
    assert loaded.resident == Resident("r-7f3a", "王大爷", 71, Sex.MALE)
    assert loaded.team[0].added_at.tzinfo is UTC
    assert locked == loaded
    assert missing is None


async def test_update_consultation_state_writes_only_state_fields(
    sql_store: SqlRecordStore,
) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation())
    changed = replace(
        consultation(),
        status=ConsultationStatus.SCHEDULED,
        status_reason="booked by coordinator",
        scheduled_time=at(300),
        updated_at=at(20),
        reason="this field is not part of the state",
    )
    async with sql_store.transaction() as repo:
        await repo.update_consultation_state(changed)
    async with sql_store.transaction() as repo:
        loaded = await repo.get_consultation(ConsultationId("c1"))
    assert loaded is not None
    assert loaded.status is ConsultationStatus.SCHEDULED
    assert loaded.status_reason == "booked by coordinator"
    assert loaded.scheduled_time == at(300)
    assert loaded.updated_at == at(20)
    assert loaded.reason == "chest pain on exertion"

    with pytest.raises(NotFound, match="consultation ghost does not exist"):
        async with sql_store.transaction() as repo:
            await repo.update_consultation_state(consultation("ghost"))


async def test_list_consultations_honours_every_filter(sql_store: SqlRecordStore) -> None:
    scheduled = ConsultationStatus.SCHEDULED
    village = "Lishan Village Clinic"
    township = "Dongxiang Township Health Centre"
    a = consultation("a", institution=village, created=at(0), team=[
        member("u-v1", Role.VILLAGE_DOCTOR, village),
    ])  # fmt: skip
    b = consultation("b", status=scheduled, institution=township, created=at(60), team=[
        member("u-t1", Role.TOWNSHIP_DOCTOR, township, minutes=1),
        member("u-c1", Role.COUNTY_PHYSICIAN, "County Hospital", minutes=2),
    ])  # fmt: skip
    c = consultation("c", status=scheduled, institution=village, created=at(120), team=[
        member("u-p1", Role.PROVINCIAL_SPECIALIST, "Provincial Hospital"),
        member("u-v1", Role.VILLAGE_DOCTOR, village, minutes=1),
    ])  # fmt: skip
    d = consultation("d", status=ConsultationStatus.ARCHIVED, institution=township,
                     created=at(180))  # fmt: skip
    async with sql_store.transaction() as repo:
        for item in (b, d, a, c):
            await repo.add_consultation(item)

    async def ids(**kwargs: object) -> list[str]:
        async with sql_store.transaction() as repo:
            found = await repo.list_consultations(ConsultationFilter(**kwargs))  # type: ignore[arg-type]
        return [x.id for x in found]

    assert await ids() == ["d", "c", "b", "a"]  # newest first
    assert await ids(status=scheduled) == ["c", "b"]
    assert await ids(member=UserId("u-v1")) == ["c", "a"]
    assert await ids(member=UserId("u-nobody")) == []
    assert await ids(role=Role.COUNTY_PHYSICIAN) == ["b"]
    assert await ids(role=Role.VILLAGE_DOCTOR, status=scheduled) == ["c"]
    assert await ids(member=UserId("u-v1"), role=Role.PROVINCIAL_SPECIALIST) == ["c"]
    # Only on the team (b), only inviting (d), both (a, c).
    assert await ids(institution="County Hospital") == ["b"]
    assert await ids(institution=township) == ["d", "b"]
    assert await ids(institution=village) == ["c", "a"]
    assert await ids(limit=2) == ["d", "c"]
    assert await ids(limit=2, offset=2) == ["b", "a"]
    assert await ids(offset=4) == []

    async with sql_store.transaction() as repo:
        listed = await repo.list_consultations(ConsultationFilter(status=scheduled))
    assert listed == [c, b]  # teams loaded, in added order
    assert [m.user_id for m in listed[1].team] == ["u-t1", "u-c1"]


# -- sessions, participations, events ------------------------------------------------------------


async def test_sessions_and_participations(sql_store: SqlRecordStore) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation("c1"))
        await repo.add_consultation(consultation("other"))
        await repo.add_session(session("s2", number=2, minutes=500))
        await repo.add_session(session("s1", number=1, minutes=10))
        await repo.add_session(session("sx", cid="other"))
        await repo.add_participation(participation("s2", "p3", "u-c1", minutes=501))
        await repo.add_participation(participation("s1", "p2", "u-p1", minutes=12))
        await repo.add_participation(participation("s1", "p1", "u-c1", minutes=11))
        await repo.add_participation(participation("sx", "p9", "u-c1", minutes=11))

    async with sql_store.transaction() as repo:
        await repo.end_session(SessionId("s1"), at(90), "ended")
        # Already ended: the first end stays.
        await repo.end_session(SessionId("s1"), at(95), "aborted")
        await repo.close_participation(
            SessionId("s1"), ParticipantId("p1"), at(40), CloseReason.NETWORK_LOST
        )
        await repo.close_participation(
            SessionId("s1"), ParticipantId("p1"), at(90), CloseReason.SESSION_ENDED
        )
        with pytest.raises(NotFound, match="session s404 does not exist"):
            await repo.end_session(SessionId("s404"), at(90), "ended")
        with pytest.raises(NotFound, match="participant p404 is not in session s1"):
            await repo.close_participation(
                SessionId("s1"), ParticipantId("p404"), at(90), CloseReason.LEFT
            )

    async with sql_store.transaction() as repo:
        sessions = await repo.list_sessions(ConsultationId("c1"))
        people = await repo.list_participations(ConsultationId("c1"))
        still_open = await repo.list_open_sessions()

    assert sessions == [
        Session(SessionId("s1"), ConsultationId("c1"), 1, at(10), at(90), "ended"),
        Session(SessionId("s2"), ConsultationId("c1"), 2, at(500), None),
    ]
    assert sorted(s.id for s in still_open) == ["s2", "sx"]
    assert [(p.session_id, p.participant_id) for p in people] == [
        ("s1", "p1"),
        ("s1", "p2"),
        ("s2", "p3"),
    ]
    assert people[0] == replace(
        participation("s1", "p1", "u-c1", 11),
        left_at=at(40),
        close_reason=CloseReason.NETWORK_LOST,
    )
    assert people[1] == participation("s1", "p2", "u-p1", 12)


async def test_event_log_seq_strictly_increasing_and_round_trip(
    sql_store: SqlRecordStore,
) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation("c1"))
        await repo.add_consultation(consultation("other"))
        await repo.add_session(session("s1"))
        await repo.add_session(session("s2", number=2))
        await repo.add_session(session("sx", cid="other"))
    appended: list[SessionEvent] = []
    # Two transactions, interleaving sessions, plus an event of another consultation between.
    batches = [
        [("s1", EventKind.SESSION_STARTED), ("s1", EventKind.JOINED)],
        [("sx", EventKind.CHAT), ("s2", EventKind.CHAT), ("s1", EventKind.LEFT)],
    ]
    for batch in batches:
        async with sql_store.transaction() as repo:
            for i, (sid, kind) in enumerate(batch):
                event = await repo.append_event(
                    SessionId(sid),
                    at(20 + len(appended)).astimezone(CST),
                    kind,
                    UserId("u-c1") if kind is not EventKind.SESSION_STARTED else None,
                    ParticipantId(f"p{i}") if kind is not EventKind.SESSION_STARTED else None,
                    {"text": "血压 160/95", "n": i, "nested": {"ok": True, "list": [1.5, None]}},
                )
                appended.append(event)

    seqs = [e.seq for e in appended]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert appended[0].at == at(20) and appended[0].at.tzinfo is UTC
    async with sql_store.transaction() as repo:
        events = await repo.list_events(ConsultationId("c1"))
        other = await repo.list_events(ConsultationId("other"))
    assert events == [e for e in appended if e.session_id != "sx"]
    assert [e.kind for e in events] == [
        EventKind.SESSION_STARTED,
        EventKind.JOINED,
        EventKind.CHAT,
        EventKind.LEFT,
    ]
    assert events[0].actor is None and events[0].participant_id is None
    assert events[2].data == {
        "text": "血压 160/95",
        "n": 1,
        "nested": {"ok": True, "list": [1.5, None]},
    }
    assert [e.session_id for e in other] == ["sx"]


# -- consents, opinions, decisions, recordings ---------------------------------------------------


async def test_consents_round_trip(sql_store: SqlRecordStore) -> None:
    await add_with_session(sql_store)
    given = [
        Consent(ConsultationId("c1"), None, ConsentKind.CONSULTATION, True, UserId("u-res"),
                "self", at(5)),
        Consent(ConsultationId("c1"), SessionId("s1"), ConsentKind.RECORDING, False,
                UserId("u-guardian"), "王大爷 (father)", at(15)),
    ]  # fmt: skip
    async with sql_store.transaction() as repo:
        for consent in reversed(given):
            await repo.add_consent(consent)
    async with sql_store.transaction() as repo:
        assert await repo.list_consents(ConsultationId("c1")) == given
        assert await repo.list_consents(ConsultationId("other")) == []


async def test_opinion_versions_with_signatures(sql_store: SqlRecordStore) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation())
        await repo.add_opinion_version(opinion(1))
        # Signed out of order of insertion: the list is ordered by signed_at.
        await repo.add_signature(ConsultationId("c1"), signature(1, "u-late", minutes=300))
        await repo.add_signature(ConsultationId("c1"), signature(1, "u-early", minutes=200))
        await repo.add_opinion_version(opinion(2, amendment="dose corrected"))

    async with sql_store.transaction() as repo:
        versions = await repo.list_opinion_versions(ConsultationId("c1"))

    assert [v.version for v in versions] == [1, 2]
    assert versions[0] == replace(
        opinion(1), signatures=(signature(1, "u-early", 200), signature(1, "u-late", 300))
    )
    assert versions[0].locked is True
    assert versions[1] == opinion(2, amendment="dose corrected")
    assert versions[1].signatures == () and versions[1].locked is False


async def test_decisions_and_recordings_round_trip(sql_store: SqlRecordStore) -> None:
    await add_with_session(sql_store)
    await add_with_session(sql_store, cid="other", sid="sx")
    decisions = [
        FinalDecision(ConsultationId("c1"), UserId("u-village"), "treat locally", at(400)),
        FinalDecision(ConsultationId("c1"), UserId("u-village"), "refer to county", at(500)),
    ]
    finished = Recording(
        id=RecordingId("r1"),
        session_id=SessionId("s1"),
        track="camera-1",
        kind="video",
        media_type="video/webm",
        sha256="ab" * 32,
        duration_s=1805.25,
        size_bytes=73_400_320_000,  # beyond 32 bits
        state="complete",
        started_at=at(11),
        ended_at=at(41),
        participant_id="p_1",
        name="王医生",
        role="county_physician",
        source="camera",
        offset_s=1.25,
    )
    running = replace(
        finished,
        id=RecordingId("r2"),
        track="mic-1",
        kind="audio",
        media_type="audio/ogg",
        sha256=None,
        duration_s=None,
        size_bytes=None,
        state="recording",
        started_at=at(12),
        ended_at=None,
    )
    elsewhere = replace(running, id=RecordingId("rx"), session_id=SessionId("sx"))
    async with sql_store.transaction() as repo:
        for decision in reversed(decisions):
            await repo.add_decision(decision)
        for recording in (running, elsewhere, finished):
            await repo.add_recording(recording, path=f"recordings/{recording.id}.webm")
    async with sql_store.transaction() as repo:
        assert await repo.list_decisions(ConsultationId("c1")) == decisions
        assert await repo.list_recordings(ConsultationId("c1")) == [finished, running]
        assert await repo.list_recordings(ConsultationId("other")) == [elsewhere]
        assert await repo.get_recording(RecordingId("r2")) == StoredRecording(
            running, ConsultationId("c1"), "recordings/r2.webm"
        )
        assert await repo.get_recording(RecordingId("r404")) is None
        in_state = await repo.list_stored_recordings(state="recording")
        assert [s.recording.id for s in in_state] == ["r2", "rx"]
        assert [s.consultation_id for s in in_state] == ["c1", "other"]
        of_session = await repo.list_stored_recordings(session_id=SessionId("s1"))
        assert [(s.recording.id, s.path) for s in of_session] == [
            ("r1", "recordings/r1.webm"),
            ("r2", "recordings/r2.webm"),
        ]
        both = await repo.list_stored_recordings(state="complete", session_id=SessionId("s1"))
        assert [s.recording.id for s in both] == ["r1"]
    # A segment closes: what changes is written, the rest stays.
    closed = replace(
        running, state="complete", sha256="cd" * 32, duration_s=3.5, size_bytes=9, ended_at=at(13)
    )
    async with sql_store.transaction() as repo:
        await repo.update_recording(replace(closed, track="ignored"))
        with pytest.raises(NotFound, match="recording r404 does not exist"):
            await repo.update_recording(replace(closed, id=RecordingId("r404")))
    async with sql_store.reading() as repo:
        assert await repo.get_recording(RecordingId("r2")) == StoredRecording(
            closed, ConsultationId("c1"), "recordings/r2.webm"
        )


# -- tokens and audit ----------------------------------------------------------------------------


async def test_revoked_tokens(sql_store: SqlRecordStore) -> None:
    async with sql_store.transaction() as repo:
        assert await repo.is_token_revoked("jti-1") is False
        await repo.revoke_token("jti-1", at(480), at(5))
        await repo.revoke_token("jti-1", at(480), at(6))  # revoking again is harmless
    async with sql_store.transaction() as repo:
        assert await repo.is_token_revoked("jti-1") is True
        assert await repo.is_token_revoked("jti-2") is False


async def test_audit_log_append_and_pages(sql_store: SqlRecordStore) -> None:
    await add_with_session(sql_store)
    async with sql_store.transaction() as repo:
        first = await repo.append_audit(audit(1, "c1", AuditAction.VIEW_CONSULTATION))
        second = await repo.append_audit(audit(2, None, AuditAction.VIEW_AUDIT))
    async with sql_store.transaction() as repo:
        third = await repo.append_audit(audit(3, "c1", AuditAction.EXPORT_RECORD))

    assert first.seq < second.seq < third.seq
    assert first.action is AuditAction.VIEW_CONSULTATION and first.at == at(1)
    async with sql_store.transaction() as repo:
        everything = await repo.list_audit(None, 100, 0)
        of_c1 = await repo.list_audit(ConsultationId("c1"), 100, 0)
        after_first = await repo.list_audit(ConsultationId("c1"), 100, first.seq)
        one = await repo.list_audit(None, 1, first.seq)
    assert everything == [first, second, third]
    assert of_c1 == [first, third]
    assert after_first == [third]
    assert one == [second]
    assert second.consultation_id is None and second.detail == {"minutes": 2, "note": "查看"}


# -- transactions, conflicts, locking ------------------------------------------------------------


async def test_transaction_rolls_back_on_exception(sql_store: SqlRecordStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with sql_store.transaction() as repo:
            await repo.add_consultation(consultation(team=[member("u-c1", Role.COUNTY_PHYSICIAN)]))
            await repo.add_session(session("s1"))
            await repo.append_audit(audit(1, "c1", AuditAction.CREATE_CONSULTATION))
            assert await repo.get_consultation(ConsultationId("c1")) is not None
            raise RuntimeError("boom")
    async with sql_store.transaction() as repo:
        assert await repo.get_consultation(ConsultationId("c1")) is None
        assert await repo.list_consultations(ConsultationFilter()) == []
        assert await repo.list_sessions(ConsultationId("c1")) == []
        assert await repo.list_audit(None, 10, 0) == []


async def test_duplicate_team_member_is_conflict_and_transaction_stays_usable(
    sql_store: SqlRecordStore,
) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation(team=[member("u-c1", Role.COUNTY_PHYSICIAN)]))
    async with sql_store.transaction() as repo:
        with pytest.raises(Conflict, match="u-c1 is already on the team of consultation c1"):
            await repo.add_team_member(
                ConsultationId("c1"), member("u-c1", Role.COUNTY_PHYSICIAN, minutes=9)
            )
        # The failed insert is undone alone; the transaction goes on and commits.
        await repo.add_team_member(ConsultationId("c1"), member("u-p1", Role.TRAINEE, minutes=3))
    async with sql_store.transaction() as repo:
        loaded = await repo.get_consultation(ConsultationId("c1"))
    assert loaded is not None
    assert [(m.user_id, m.role) for m in loaded.team] == [
        ("u-c1", Role.COUNTY_PHYSICIAN),
        ("u-p1", Role.TRAINEE),
    ]


async def test_duplicate_signature_and_dangling_references_are_conflicts(
    sql_store: SqlRecordStore,
) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation())
        await repo.add_opinion_version(opinion(1))
        await repo.add_signature(ConsultationId("c1"), signature(1, "u-p1", 200))
    async with sql_store.transaction() as repo:
        with pytest.raises(Conflict, match="u-p1 has already signed version 1 of the opinion"):
            await repo.add_signature(ConsultationId("c1"), signature(1, "u-p1", 201))
        with pytest.raises(Conflict, match="version 1 of the opinion on consultation c1 already"):
            await repo.add_opinion_version(opinion(1))
        with pytest.raises(Conflict, match="opinion_signatures row refers to a record that does"):
            await repo.add_signature(ConsultationId("c1"), signature(7, "u-p1", 202))
        with pytest.raises(Conflict, match="team_members row refers to a record that does not"):
            await repo.add_team_member(ConsultationId("ghost"), member("u-x", Role.TRAINEE))
        with pytest.raises(Conflict, match="consultation c1 already exists"):
            await repo.add_consultation(consultation())
    async with sql_store.transaction() as repo:
        (version,) = await repo.list_opinion_versions(ConsultationId("c1"))
    assert version.signatures == (signature(1, "u-p1", 200),)


async def test_for_update_serialises_read_modify_write(sql_store: SqlRecordStore) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation())

    async def append_reason(tag: str) -> None:
        async with sql_store.transaction() as repo:
            current = await repo.get_consultation(ConsultationId("c1"), for_update=True)
            assert current is not None
            await asyncio.sleep(0.05)  # let the other task try to read meanwhile
            current.status_reason = (current.status_reason or "") + tag
            await repo.update_consultation_state(current)

    await asyncio.gather(append_reason("a"), append_reason("b"))
    async with sql_store.transaction() as repo:
        loaded = await repo.get_consultation(ConsultationId("c1"))
    assert loaded is not None
    assert sorted(loaded.status_reason or "") == ["a", "b"]  # neither update was lost


async def test_naive_datetimes_are_refused(sql_store: SqlRecordStore) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with sql_store.transaction() as repo:
            await repo.add_consultation(consultation(created=datetime(2025, 3, 1, 8, 0)))


async def test_ping(sql_store: SqlRecordStore, tmp_path: Path) -> None:
    await sql_store.ping()  # reachable; the contrast is below
    unreachable = SqlRecordStore(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}")
    await unreachable.start()
    try:
        with pytest.raises(OperationalError, match="unable to open database file"):
            await unreachable.ping()
    finally:
        await unreachable.stop()
    with pytest.raises(RuntimeError, match="not started"):
        await SqlRecordStore("sqlite+aiosqlite:///unused.db").ping()


def test_repository_implements_every_protocol_method() -> None:
    wanted = {
        name
        for name, value in vars(RecordRepository).items()
        if inspect.iscoroutinefunction(value) and not name.startswith("_")
    }
    assert {"add_consultation", "append_event", "list_audit"} <= wanted  # the scan found them
    assert wanted <= set(vars(SqlRecordRepository))


def test_append_only_tables_have_no_update_or_delete_path() -> None:
    # The database refuses such statements anyway (tests/test_record_chain.py); this keeps the
    # store from even trying. The one exception is destruction under retention, in its own
    # module that only `telemed retention run` uses (tests/test_retention.py checks both).
    source = "\n".join(
        p.read_text(encoding="utf-8")
        for p in Path(server.db.__file__).parent.glob("*.py")
        if p.name != "retention.py"
    )
    assert "session_events" in source and "audit_log" in source
    assert re.search(r"(update|delete)\(\s*(session_events|audit_log)\b", source) is None
    assert re.search(r"(session_events|audit_log)\.(update|delete)\(", source) is None
    # No deletes anywhere in the store but of expired invite codes (not part of the record:
    # a lookup table whose rows hold names only until the invite expires).
    assert re.search(r"\bdelete\((?!invite_codes\))", source) is None
    assert len(re.findall(r"\bdelete\(", source)) == 1


# -- migrations ----------------------------------------------------------------------------------


async def _schema_diffs(db: TestDatabase, target: MetaData) -> list[object]:
    engine = make_engine(db.url, connect_args=db.connect_args)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), target
                )
            )
    finally:
        await engine.dispose()


async def _table_names(db: TestDatabase) -> set[str]:
    engine = make_engine(db.url, connect_args=db.connect_args)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: sa_inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def test_migrations_match_metadata(migrated_db: TestDatabase) -> None:
    assert await _schema_diffs(migrated_db, metadata) == []
    # The comparison is not vacuous: a table the migrations lack is reported.
    extended = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(extended)
    Table("not_migrated", extended, Column("id", Integer, primary_key=True))
    diffs = await _schema_diffs(migrated_db, extended)
    assert [(d[0], d[1].name) for d in diffs] == [("add_table", "not_migrated")]  # type: ignore[index]


async def test_upgrade_is_idempotent_and_keeps_data(
    migrated_db: TestDatabase, sql_store: SqlRecordStore
) -> None:
    await add_with_session(sql_store)
    await upgrade(migrated_db.url, connect_args=migrated_db.connect_args)
    # Revisions are numbered files, each revising the one before.
    versions = Path(server.db.__file__).parent.parent / "migrations" / "versions"
    newest = max(p.name.split("_")[0] for p in versions.glob("[0-9]*_*.py"))
    assert head_revision() == newest
    assert await current_revision(migrated_db.url, connect_args=migrated_db.connect_args) == newest
    assert await _table_names(migrated_db) == ALL_TABLES | {"alembic_version"}
    async with sql_store.transaction() as repo:
        assert [s.id for s in await repo.list_sessions(ConsultationId("c1"))] == ["s1"]


async def test_downgrade_to_base_and_back(empty_db: TestDatabase) -> None:
    url, args = empty_db.url, empty_db.connect_args
    assert await current_revision(url, connect_args=args) is None
    await upgrade(url, connect_args=args)
    assert await _table_names(empty_db) == ALL_TABLES | {"alembic_version"}
    await downgrade_to_base(url, connect_args=args)
    assert await _table_names(empty_db) == {"alembic_version"}
    assert await current_revision(url, connect_args=args) is None
    await upgrade(url, connect_args=args)
    assert await current_revision(url, connect_args=args) == head_revision()
    assert await _schema_diffs(empty_db, metadata) == []


async def test_upgrade_creates_sqlite_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "data" / "nested" / "telemed.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    assert path.is_file()
    assert await current_revision(url) == head_revision()


def test_upgrade_sync_for_the_cli(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    upgrade_sync(url)
    upgrade_sync(url)
    assert asyncio.run(current_revision(url)) == head_revision()


async def test_session_events_of_one_kind_newest_last_through_a_read(
    sql_store: SqlRecordStore,
) -> None:
    async with sql_store.transaction() as repo:
        await repo.add_consultation(consultation("c1"))
        await repo.add_session(session("s1"))
        await repo.add_session(session("s2", number=2))
        for n in range(5):
            for sid in ("s1", "s2"):
                await repo.append_event(
                    SessionId(sid), at(n), EventKind.CHAT, UserId("u-c1"), None, {"n": n}
                )
            await repo.append_event(
                SessionId("s1"), at(n), EventKind.HAND_RAISED, UserId("u-c1"), None, {}
            )
    # A read-only transaction sees what was committed.
    async with sql_store.reading() as repo:
        newest = await repo.list_session_events(SessionId("s1"), EventKind.CHAT, 3)
        none = await repo.list_session_events(SessionId("s2"), EventKind.ANNOTATION, 3)
    assert [(e.session_id, e.data["n"]) for e in newest] == [("s1", 2), ("s1", 3), ("s1", 4)]
    assert [e.seq for e in newest] == sorted(e.seq for e in newest)
    assert none == []


async def test_a_read_does_not_wait_for_a_writer(sql_store: SqlRecordStore) -> None:
    """While a write transaction is open, reads go on (SQLite: WAL snapshot, no lock)."""
    async with sql_store.transaction() as writer:
        await writer.add_consultation(consultation("c1"))
        async with sql_store.reading() as reader:
            # The uncommitted consultation is not visible; the read does not block.
            assert await reader.get_consultation(ConsultationId("c1")) is None
    async with sql_store.reading() as reader:
        found = await reader.get_consultation(ConsultationId("c1"))
    assert found is not None and found.id == "c1"
