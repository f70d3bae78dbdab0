"""Opinion signatures with a key: the Ed25519 signature and the signing key's id.

Signatures made before this revision keep NULL in both: they had only the content hash, and
signing them now would attest to something nobody signed (they read as "unsigned").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("opinion_signatures", sa.Column("key_id", sa.String(64), nullable=True))
    op.add_column("opinion_signatures", sa.Column("signature", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("opinion_signatures") as batch:
        batch.drop_column("signature")
        batch.drop_column("key_id")
