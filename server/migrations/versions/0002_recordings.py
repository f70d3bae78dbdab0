"""Recordings: whose track, where on the session clock, render progress; why a session ended.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(64)
NAME = sa.String(200)
ENUM = sa.String(32)
DOUBLE: sa.Double[float] = sa.Double()


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("end_reason", ENUM, nullable=True))
    with op.batch_alter_table("recordings") as batch:
        batch.add_column(sa.Column("participant_id", ID, nullable=True))
        batch.add_column(sa.Column("name", NAME, nullable=True))
        batch.add_column(sa.Column("role", ENUM, nullable=True))
        batch.add_column(sa.Column("source", ENUM, nullable=True))
        batch.add_column(sa.Column("offset_s", DOUBLE, nullable=True))
        batch.add_column(sa.Column("progress", DOUBLE, nullable=True))
        batch.create_index("ix_recordings_state", ["state"])


def downgrade() -> None:
    with op.batch_alter_table("recordings") as batch:
        batch.drop_index("ix_recordings_state")
        for column in ("progress", "offset_s", "source", "role", "name", "participant_id"):
            batch.drop_column(column)
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("end_reason")
