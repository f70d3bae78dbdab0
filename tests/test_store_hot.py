"""The signaling hot path (server/db/hot.py) writes and reads exactly what the repository
does, on SQLite and PostgreSQL: the same rows, the same chain, chat in arrival order and none
acknowledged that is not stored."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from test_store import (
    at,
    consultation,
    member,
    participation,
    session,
)

from rooms.errors import Conflict
from rooms.model import (
    Consent,
    ConsentKind,
    ConsultationId,
    EventKind,
    ParticipantId,
    SessionEvent,
    SessionId,
    UserId,
)
from rooms.roles import Role
from rooms.store import NewEvent
from server.db import chain
from server.db.store import SqlRecordStore

pytest_plugins = ["db_fixtures"]


def chat(sid: str, minutes: float, text: str) -> NewEvent:
    return NewEvent(
        SessionId(sid),
        at(minutes),
        EventKind.CHAT,
        UserId("u-c1"),
        ParticipantId("p1"),
        {"text": text, "name": "Dr 王", "role": "county_physician"},
    )


async def world(store: SqlRecordStore) -> None:
    team = [
        member("u-b", Role.COUNTY_PHYSICIAN, minutes=2),
        member("u-a", Role.PROVINCIAL_SPECIALIST, "省医院", minutes=1),
        member("u-c", Role.TOWNSHIP_DOCTOR, minutes=2),
    ]
    async with store.transaction() as repo:
        await repo.add_consultation(consultation("c1", team=team))
        await repo.add_consultation(consultation("c2"))
        await repo.add_session(session("s1", "c1"))
        await repo.add_session(session("s2", "c2"))


async def events_of(store: SqlRecordStore, cid: str) -> list[SessionEvent]:
    async with store.reading() as repo:
        return await repo.list_events(ConsultationId(cid))


async def chain_problems(store: SqlRecordStore, cid: str) -> list[chain.ChainProblem]:
    async with store.reading() as repo:
        return await chain.verify_events(repo.connection, ConsultationId(cid))


async def test_the_consultation_read_is_the_repositorys(sql_store: SqlRecordStore) -> None:
    await world(sql_store)
    for cid in ("c1", "c2"):
        async with sql_store.reading() as repo:
            expected = await repo.get_consultation(ConsultationId(cid))
        found = await sql_store.get_consultation(ConsultationId(cid))
        assert found == expected
        assert found is not None and found.preferred_time == at(60 * 24)
    found = await sql_store.get_consultation(ConsultationId("c1"))
    assert found is not None and [m.user_id for m in found.team] == ["u-a", "u-b", "u-c"]
    assert await sql_store.get_consultation(ConsultationId("nope")) is None


async def test_chat_from_many_senders_is_stored_in_arrival_order(
    sql_store: SqlRecordStore,
) -> None:
    await world(sql_store)
    sent = [chat("s1" if i % 3 else "s2", i, f"message {i}") for i in range(60)]
    stored = await asyncio.gather(*(sql_store.append_chat(e) for e in sent))
    # Every acknowledgement names its row, in the order the messages arrived, per chain.
    for cid, sid in (("c1", "s1"), ("c2", "s2")):
        events = await events_of(sql_store, cid)
        mine = [s for s, e in zip(stored, sent, strict=True) if e.session_id == sid]
        assert events == mine
        assert [e.data["text"] for e in events] == [
            e.data["text"] for e in sent if e.session_id == sid
        ]
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        assert await chain_problems(sql_store, cid) == []
    # The repository's own appends carry on the same chain.
    async with sql_store.transaction() as repo:
        await repo.append_event(SessionId("s1"), at(99), EventKind.HAND_RAISED, None, None, {})
    await sql_store.append_chat(chat("s1", 100, "after"))
    assert await chain_problems(sql_store, "c1") == []
    assert [e.kind for e in (await events_of(sql_store, "c1"))[-2:]] == [
        EventKind.HAND_RAISED,
        EventKind.CHAT,
    ]


async def test_a_chat_of_no_session_is_refused_alone(sql_store: SqlRecordStore) -> None:
    await world(sql_store)
    good = [chat("s1", i, f"ok {i}") for i in range(5)]
    results = await asyncio.gather(
        *(sql_store.append_chat(e) for e in good[:2]),
        sql_store.append_chat(chat("s-missing", 3, "lost")),
        *(sql_store.append_chat(e) for e in good[2:]),
        return_exceptions=True,
    )
    assert isinstance(results[2], Conflict), results[2]
    assert "refers to a record that does not exist" in str(results[2])
    assert [e.data["text"] for e in await events_of(sql_store, "c1")] == [
        e.data["text"] for e in good
    ]
    assert await chain_problems(sql_store, "c1") == []


async def test_a_seat_writes_the_rows_and_reads_its_snapshot(sql_store: SqlRecordStore) -> None:
    await world(sql_store)
    given = Consent(
        ConsultationId("c1"), SessionId("s1"), ConsentKind.RECORDING, True, UserId("r"), "r", at(5)
    )
    async with sql_store.transaction() as repo:
        await repo.add_consent(given)
    for i in range(5):
        await sql_store.append_chat(chat("s1", 10 + i, f"chat {i}"))
    seat = participation("s1", "p7", "u-b", minutes=20)
    joined = NewEvent(
        SessionId("s1"),
        at(20) + timedelta(microseconds=7),
        EventKind.JOINED,
        UserId("u-b"),
        ParticipantId("p7"),
        {"name": "Dr u-b", "role": "county_physician", "admitted_by": None},
    )
    record = await sql_store.seat(seat, joined, chat_limit=3)
    assert [e.data["text"] for e in record.chat] == ["chat 2", "chat 3", "chat 4"]
    assert record.consents == [given]
    async with sql_store.reading() as repo:
        assert await repo.list_participations(ConsultationId("c1")) == [seat]
        assert await repo.list_session_events(SessionId("s1"), EventKind.CHAT, 3) == record.chat
    events = await events_of(sql_store, "c1")
    assert events[-1] == record.joined
    assert record.joined.at == joined.at and record.joined.data == joined.data
    assert await chain_problems(sql_store, "c1") == []

    # The same seat again: refused, and nothing of it kept (not even its event).
    with pytest.raises(Conflict, match="p7 already joined session s1"):
        await sql_store.seat(seat, joined, chat_limit=3)
    assert await events_of(sql_store, "c1") == events
    assert await chain_problems(sql_store, "c1") == []


async def test_revoked_tokens_are_seen_at_once(sql_store: SqlRecordStore) -> None:
    assert await sql_store.is_token_revoked("jti-1") is False
    async with sql_store.transaction() as repo:
        await repo.revoke_token("jti-1", at(60), at(1))
    assert await sql_store.is_token_revoked("jti-1") is True
    assert await sql_store.is_token_revoked("jti-2") is False


async def test_a_seat_can_start_a_chain(sql_store: SqlRecordStore) -> None:
    await world(sql_store)
    seat = participation("s2", "p1", "u-b", minutes=20)
    joined = NewEvent(
        SessionId("s2"), at(20), EventKind.JOINED, UserId("u-b"), ParticipantId("p1"), {}
    )
    record = await sql_store.seat(seat, joined, chat_limit=10)
    assert record.chat == [] and record.consents == []
    assert await events_of(sql_store, "c2") == [record.joined]
    assert await chain_problems(sql_store, "c2") == []
