"""The record's keys and tampering with it: a signing key file for servers outside --dev, and
statements run the way someone with database access could, with the append-only triggers
switched off (dropped on SQLite, disabled on PostgreSQL) and back on afterwards, for the tests
that check that verification notices."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from server.db.append_only import sqlite_trigger_names, sqlite_triggers
from server.db.store import SqlRecordStore


def signing_key_file(directory: Path, name: str = "signing-key.pem") -> Path:
    """A new Ed25519 private key in a PEM file: TELEMED_SIGNING_KEY_FILE for `telemed serve`."""
    path = directory / name
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


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
