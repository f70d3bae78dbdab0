"""Attachments: files in the record (images, PDF, DICOM, snapshots of video tiles).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The types of server/db/tables.py as of this revision.
ID = sa.String(64)
USER = sa.String(128)
NAME = sa.String(200)
ENUM = sa.String(32)
HASH = sa.String(64)
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "attachments",
        sa.Column("id", ID, nullable=False),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=True),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("media_type", NAME, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", HASH, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("filename", NAME, nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("added_by", USER, nullable=False),
        sa.Column("added_by_name", NAME, nullable=False),
        sa.Column("added_by_role", ENUM, nullable=False),
        sa.Column("added_at", TIMESTAMP, nullable=False),
        sa.Column("taken_at", TIMESTAMP, nullable=True),
        sa.Column("track", NAME, nullable=True),
        sa.ForeignKeyConstraint(
            ["consultation_id"], ["consultations.id"], name="fk_attachments_consultation_id"
        ),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_attachments_session_id"),
        sa.PrimaryKeyConstraint("id", name="pk_attachments"),
    )
    op.create_index("ix_attachments_consultation_id", "attachments", ["consultation_id"])
    op.create_index("ix_attachments_session_id", "attachments", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_attachments_session_id", table_name="attachments")
    op.drop_index("ix_attachments_consultation_id", table_name="attachments")
    op.drop_table("attachments")
