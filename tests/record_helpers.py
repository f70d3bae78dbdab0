"""Tampering with the record the way someone with database access could: statements run with
the append-only triggers switched off (dropped on SQLite, disabled on PostgreSQL) and back on
afterwards, for the tests that check that verification notices."""

from __future__ import annotations

from sqlalchemy import text

from server.db.append_only import sqlite_trigger_names, sqlite_triggers
from server.db.store import SqlRecordStore


async def tamper(store: SqlRecordStore, table: str, statement: str) -> None:
    """Runs `statement` (on `table`) past that table's triggers."""
    async with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            await conn.execute(text(statement))
            await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
            return
        for name in sqlite_trigger_names(table):
            await conn.execute(text(f"DROP TRIGGER {name}"))
        await conn.execute(text(statement))
        for create in sqlite_triggers(table):
            await conn.execute(text(create))
