"""The event and audit logs as hash chains, append-only in the database itself, with
retention's one way to destroy; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from db_fixtures import TestDatabase
from record_helpers import tamper
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from test_retention import DEFAULT, NOW, build_world, entry, t

from rooms.model import AuditAction, ConsultationId, EventKind, SessionId, UserId
from server.db import chain
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore
from server.db.tables import audit_log, chain_heads, session_events
from server.retention import run_retention

pytest_plugins = ["db_fixtures"]


async def add_events(store: SqlRecordStore, sid: str, n: int) -> list[int]:
    seqs = []
    async with store.transaction() as tx:
        for i in range(n):
            event = await tx.append_event(
                SessionId(sid), t(2025) + timedelta(seconds=i), EventKind.CHAT,
                UserId("u-village"), None, {"text": f"第{i}句", "n": i / 3},
            )  # fmt: skip
            seqs.append(event.seq)
    return seqs


async def problems(store: SqlRecordStore, cid: str) -> list[chain.ChainProblem]:
    async with store.reading() as tx:
        return await chain.verify_events(tx.connection, ConsultationId(cid)) + (
            await chain.verify_audit(tx.connection)
        )


async def test_each_row_links_to_the_one_before_per_consultation_and_globally(
    sql_store: SqlRecordStore, tmp_path: Path
) -> None:
    await build_world(sql_store, tmp_path / "data")
    old = await add_events(sql_store, "s-old", 3)
    recent = await add_events(sql_store, "s-recent", 2)
    async with sql_store.reading() as tx:
        rows = (
            (await tx.connection.execute(select(session_events).order_by(session_events.c.id)))
            .mappings()
            .all()
        )
        audit = (await tx.connection.execute(select(audit_log).order_by(audit_log.c.id))).all()
        head_rows = await tx.connection.execute(
            select(chain_heads.c.chain, chain_heads.c.head_hash)
        )
        heads = {name: digest for name, digest in head_rows.all()}
    by_seq = {r["id"]: r for r in rows}
    # Interleaved in the table, each consultation's events are a chain of their own.
    assert by_seq[old[0]]["prev_hash"] == chain.GENESIS
    assert by_seq[old[1]]["prev_hash"] == by_seq[old[0]]["hash"]
    assert by_seq[recent[0]]["prev_hash"] == chain.GENESIS
    assert by_seq[recent[1]]["prev_hash"] == by_seq[recent[0]]["hash"]
    assert heads["events:old"] == by_seq[old[-1]]["hash"]
    assert [a.prev_hash for a in audit[1:]] == [a.hash for a in audit[:-1]]
    assert heads["audit"] == audit[-1].hash
    assert await problems(sql_store, "old") == []


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("session_events", "UPDATE session_events SET kind = 'chat'"),
        ("session_events", "DELETE FROM session_events"),
        ("audit_log", "UPDATE audit_log SET actor = 'someone else'"),
        ("audit_log", "DELETE FROM audit_log WHERE action = 'view_record'"),
    ],
)
async def test_the_database_refuses_to_change_or_delete(
    sql_store: SqlRecordStore, tmp_path: Path, table: str, statement: str
) -> None:
    await build_world(sql_store, tmp_path / "data")
    await add_events(sql_store, "s-old", 2)
    with pytest.raises(DBAPIError, match=f"{table} is append-only"):
        async with sql_store.engine.begin() as conn:
            await conn.execute(text(statement))
    assert await problems(sql_store, "old") == []


async def test_postgresql_refuses_truncate(sql_store: SqlRecordStore, tmp_path: Path) -> None:
    if sql_store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no TRUNCATE")
    await build_world(sql_store, tmp_path / "data")
    for table in ("session_events", "audit_log"):
        with pytest.raises(DBAPIError, match=f"{table} is append-only: TRUNCATE refused"):
            async with sql_store.engine.begin() as conn:
                await conn.execute(text(f"TRUNCATE {table} CASCADE"))


async def test_retention_destroys_through_its_path_and_the_chain_still_verifies(
    sql_store: SqlRecordStore, tmp_path: Path
) -> None:
    world = await build_world(sql_store, tmp_path / "data")
    await add_events(sql_store, "s-old", 2)
    await add_events(sql_store, "s-recent", 2)
    async with sql_store.reading() as tx:
        old_head = await chain.read_head(tx.connection, "events:old")
    await run_retention(sql_store, DEFAULT, world.data_dir, NOW)
    entries = await world.audit()
    record = next(e for e in entries if e.target == "record" and e.consultation_id == "old")
    # The destroy entry keeps the head of the event chain that went with the record.
    assert old_head is not None and record.detail["event_chain_head"] == old_head[0]
    assert record.detail["rows"]["session_events"] == 2
    purges = [e for e in entries if e.target == "audit_log"]
    assert purges and all(e.detail["chain_runs"] for e in purges)
    async with sql_store.reading() as tx:
        assert await chain.read_head(tx.connection, "events:old") is None
    # The gaps retention made are bridged by its destroy entries; nothing else is reported.
    assert await problems(sql_store, "recent") == []
    # The marker never outlives the transaction: the triggers refuse again afterwards.
    with pytest.raises(DBAPIError, match="append-only"):
        async with sql_store.engine.begin() as conn:
            await conn.execute(text("DELETE FROM session_events"))


async def test_tampering_is_reported_row_by_row(sql_store: SqlRecordStore, tmp_path: Path) -> None:
    await build_world(sql_store, tmp_path / "data")
    seqs = await add_events(sql_store, "s-old", 4)
    await tamper(
        sql_store, "session_events", f"UPDATE session_events SET actor = 'u-x' WHERE id = {seqs[1]}"
    )
    await tamper(sql_store, "session_events", f"DELETE FROM session_events WHERE id = {seqs[3]}")
    async with sql_store.reading() as tx:
        ids = await tx.connection.execute(select(audit_log.c.id).order_by(audit_log.c.id))
        audit_ids = list(ids.scalars())
    await tamper(sql_store, "audit_log", f"DELETE FROM audit_log WHERE id = {audit_ids[2]}")
    changed, truncated, unlinked = await problems(sql_store, "old")
    assert (changed.seq, changed.consultation_id) == (seqs[1], "old")
    assert changed.problem == f"event {seqs[1]} was changed: its content does not match its hash"
    assert changed.expected != changed.found
    assert truncated.seq == 0 and f"newest event {seqs[2]} (later rows removed" in truncated.problem
    assert truncated.expected.endswith(f"(seq {seqs[3]})")
    assert unlinked.seq == audit_ids[3]
    assert unlinked.problem.startswith(f"audit entry {audit_ids[3]} does not link")


async def test_concurrent_appends_do_not_fork_the_chains(sql_store: SqlRecordStore) -> None:
    async with sql_store.transaction() as tx:
        await tx.append_audit(entry(None, AuditAction.VIEW_AUDIT, t(2030)))

    async def one(i: int) -> None:
        async with sql_store.transaction() as tx:
            await tx.append_audit(entry(None, AuditAction.VIEW_AUDIT, t(2030) + timedelta(i)))

    await asyncio.gather(*(one(i) for i in range(12)))
    async with sql_store.reading() as tx:
        assert await chain.verify_audit(tx.connection) == []
        rows = (await tx.connection.execute(select(audit_log.c.prev_hash))).scalars().all()
    assert len(set(rows)) == len(rows) == 13  # no two rows extend the same hash


async def test_concurrent_events_and_audit_entries_neither_fork_nor_deadlock(
    sql_store: SqlRecordStore, tmp_path: Path
) -> None:
    await build_world(sql_store, tmp_path / "data")

    async def one(i: int) -> None:
        # Two consultations' chains and the audit chain, locked in the one order.
        sid, cid = ("s-old", "old") if i % 2 else ("s-recent", "recent")
        async with sql_store.transaction() as tx:
            await tx.append_event(SessionId(sid), t(2030), EventKind.CHAT, None, None, {"i": i})
            await tx.append_audit(entry(cid, AuditAction.VIEW_RECORD, t(2030)))

    await asyncio.gather(*(one(i) for i in range(16)))
    assert await problems(sql_store, "old") == [] and await problems(sql_store, "recent") == []
    async with sql_store.reading() as tx:
        assert len(await tx.list_events(ConsultationId("old"))) == 8


async def test_events_after_audit_in_one_transaction_are_refused(
    sql_store: SqlRecordStore, tmp_path: Path
) -> None:
    await build_world(sql_store, tmp_path / "data")
    with pytest.raises(RuntimeError, match="append events before audit entries"):
        async with sql_store.transaction() as tx:
            await tx.append_audit(entry("old", AuditAction.VIEW_RECORD, t(2030)))
            await tx.append_event(SessionId("s-old"), t(2030), EventKind.CHAT, None, None, {})


async def test_the_migration_chains_the_rows_already_there(empty_db: TestDatabase) -> None:
    url, args = empty_db.url, empty_db.connect_args
    await upgrade(url, "0003", connect_args=args)
    store = SqlRecordStore(url, connect_args=args)
    await store.start()
    try:
        at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC).isoformat(sep=" ")
        async with store.engine.begin() as conn:
            for statement in (
                "INSERT INTO consultations VALUES ('c1','consultation','cardiology','r','王',70,"
                f"'male','inst','u-v','r','p','s','cardiology','t',NULL,NULL,'live',NULL,"
                f"'{at}','{at}')",
                f"INSERT INTO sessions VALUES ('s1','c1',1,'{at}',NULL,NULL)",
                "INSERT INTO session_events (session_id, at, kind, actor, participant_id, data) "
                f"VALUES ('s1','{at}','chat','u-v',NULL,'{{\"text\": \"你好\"}}')",
                "INSERT INTO session_events (session_id, at, kind, actor, participant_id, data) "
                f"VALUES ('s1','{at}','chat',NULL,'p1','{{}}')",
                "INSERT INTO audit_log (at, actor, actor_role, action, consultation_id, target,"
                f" remote_addr, detail) VALUES ('{at}','u-v','village_doctor','view_record','c1',"
                "NULL,NULL,'{\"a\": [1, 2.5]}')",
            ):
                await conn.execute(text(statement))
        await upgrade(url, connect_args=args)
        assert await problems(store, "c1") == []
        async with store.transaction() as tx:
            await tx.append_event(SessionId("s1"), NOW, EventKind.CHAT, None, None, {"x": 1})
        assert await problems(store, "c1") == []
    finally:
        await store.stop()
