"""Retention: legal holds per consultation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The types of server/db/tables.py as of this revision.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ID = sa.String(64)
USER = sa.String(128)
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "legal_holds",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("placed_by", USER, nullable=False),
        sa.Column("placed_at", TIMESTAMP, nullable=False),
        sa.Column("released_by", USER, nullable=True),
        sa.Column("released_at", TIMESTAMP, nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_legal_holds"),
    )
    op.create_index("ix_legal_holds_consultation_id", "legal_holds", ["consultation_id"])


def downgrade() -> None:
    op.drop_index("ix_legal_holds_consultation_id", table_name="legal_holds")
    op.drop_table("legal_holds")
