"""The tamper-evident record: hash chains over the event and audit logs, append-only triggers.

Adds prev_hash/hash to session_events and audit_log and chains the rows already there (per
consultation for events, one chain for the audit log, in seq order; see server/db/chain.py),
the chain_heads table, the retention_marker table, and the triggers that refuse UPDATE and
DELETE (and TRUNCATE on PostgreSQL) on both tables except a DELETE while retention's marker
row is present (server/db/retention.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.db.append_only import (
    APPEND_ONLY_TABLES,
    PG_FUNCTION,
    pg_triggers,
    sqlite_trigger_names,
    sqlite_triggers,
)
from server.db.chain import AUDIT_CHAIN, AUDIT_FIELDS, EVENT_FIELDS, GENESIS, event_chain, row_hash
from server.db.tables import Json, UtcDateTime

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HASH = sa.String(64)
APPEND_ONLY = APPEND_ONLY_TABLES

# The columns the hashes cover, with the types the store reads them with (so the backfilled
# hashes are those the store computes).
_meta = sa.MetaData()
_events = sa.Table(
    "session_events",
    _meta,
    sa.Column("id", sa.Integer),
    sa.Column("session_id", sa.String),
    sa.Column("at", UtcDateTime),
    sa.Column("kind", sa.String),
    sa.Column("actor", sa.String),
    sa.Column("participant_id", sa.String),
    sa.Column("data", Json),
    sa.Column("prev_hash", HASH),
    sa.Column("hash", HASH),
)
_sessions = sa.Table(
    "sessions", _meta, sa.Column("id", sa.String), sa.Column("consultation_id", sa.String)
)
_audit = sa.Table(
    "audit_log",
    _meta,
    sa.Column("id", sa.Integer),
    sa.Column("at", UtcDateTime),
    sa.Column("actor", sa.String),
    sa.Column("actor_role", sa.String),
    sa.Column("action", sa.String),
    sa.Column("consultation_id", sa.String),
    sa.Column("target", sa.Text),
    sa.Column("remote_addr", sa.String),
    sa.Column("detail", Json),
    sa.Column("prev_hash", HASH),
    sa.Column("hash", HASH),
)
_heads = sa.Table(
    "chain_heads",
    _meta,
    sa.Column("chain", sa.String),
    sa.Column("head_hash", HASH),
    sa.Column("head_seq", sa.BigInteger),
)


def upgrade() -> None:
    for table in APPEND_ONLY:
        for column in ("prev_hash", "hash"):
            # A default only to add the column to existing rows; they are chained below.
            op.add_column(table, sa.Column(column, HASH, nullable=False, server_default=""))
    op.create_table(
        "chain_heads",
        sa.Column("chain", sa.String(96), nullable=False),
        sa.Column("head_hash", HASH, nullable=False),
        sa.Column("head_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("chain", name="pk_chain_heads"),
    )
    op.create_table(
        "retention_marker",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_retention_marker"),
    )
    _chain_existing_rows()
    if op.get_context().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            for column in ("prev_hash", "hash"):
                op.alter_column(table, column, server_default=None)
        op.execute(PG_FUNCTION)
        for table in APPEND_ONLY:
            for statement in pg_triggers(table):
                op.execute(statement)
        return
    for table in APPEND_ONLY:
        for statement in sqlite_triggers(table):
            op.execute(statement)


def _chain_existing_rows() -> None:
    conn = op.get_bind()
    heads: dict[str, tuple[str, int]] = {}
    events = (
        conn.execute(
            sa.select(_events, _sessions.c.consultation_id)
            .join(_sessions, _sessions.c.id == _events.c.session_id)
            .order_by(_events.c.id)
        )
        .mappings()
        .all()
    )
    for row in events:
        chain = event_chain(row["consultation_id"])
        prev = heads.get(chain, (GENESIS, 0))[0]
        digest = row_hash(prev, row, EVENT_FIELDS)
        conn.execute(
            sa.update(_events).where(_events.c.id == row["id"]).values(prev_hash=prev, hash=digest)
        )
        heads[chain] = (digest, row["id"])
    prev = GENESIS
    for row in conn.execute(sa.select(_audit).order_by(_audit.c.id)).mappings().all():
        digest = row_hash(prev, row, AUDIT_FIELDS)
        conn.execute(
            sa.update(_audit).where(_audit.c.id == row["id"]).values(prev_hash=prev, hash=digest)
        )
        prev = digest
        heads[AUDIT_CHAIN] = (digest, row["id"])
    for chain, (digest, seq) in heads.items():
        conn.execute(sa.insert(_heads).values(chain=chain, head_hash=digest, head_seq=seq))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION telemed_append_only()")
    else:
        for table in APPEND_ONLY:
            for name in sqlite_trigger_names(table):
                op.execute(f"DROP TRIGGER {name}")
    op.drop_table("retention_marker")
    op.drop_table("chain_heads")
    for table in APPEND_ONLY:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("hash")
            batch.drop_column("prev_hash")
