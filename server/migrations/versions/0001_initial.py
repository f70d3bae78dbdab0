"""The consultation record: consultations, sessions, opinions, recordings, audit.

Revision ID: 0001
Revises:
Create Date: 2025-11-22

Written out by hand rather than generated, and frozen: later schema changes go in new
revisions. tests/test_store.py checks that head matches server/db/tables.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The types of server/db/tables.py as of this revision.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(64)
USER = sa.String(128)
NAME = sa.String(200)
ENUM = sa.String(32)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column[object]:
    return sa.Column("id", BIG_ID, autoincrement=True, nullable=False)


def upgrade() -> None:
    op.create_table(
        "consultations",
        sa.Column("id", ID, nullable=False),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("specialty", NAME, nullable=False),
        sa.Column("resident_pseudonym", USER, nullable=False),
        sa.Column("resident_name", NAME, nullable=False),
        sa.Column("resident_age", sa.Integer(), nullable=False),
        sa.Column("resident_sex", ENUM, nullable=False),
        sa.Column("inviting_institution", NAME, nullable=False),
        sa.Column("inviting_clinician", USER, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("case_summary", sa.Text(), nullable=False),
        sa.Column("requested_specialty", NAME, nullable=False),
        sa.Column("requested_title", NAME, nullable=False),
        _ts("preferred_time", nullable=True),
        _ts("scheduled_time", nullable=True),
        sa.Column("status", ENUM, nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_consultations"),
    )
    op.create_index("ix_consultations_status", "consultations", ["status"])
    op.create_index("ix_consultations_created_at", "consultations", ["created_at"])
    op.create_index(
        "ix_consultations_inviting_institution", "consultations", ["inviting_institution"]
    )

    op.create_table(
        "team_members",
        _id(),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("user_id", USER, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("role", ENUM, nullable=False),
        sa.Column("institution", NAME, nullable=False),
        _ts("added_at"),
        sa.PrimaryKeyConstraint("id", name="pk_team_members"),
        sa.ForeignKeyConstraint(
            ["consultation_id"],
            ["consultations.id"],
            name="fk_team_members_consultation_id",
        ),
        sa.UniqueConstraint(
            "consultation_id", "user_id", name="uq_team_members_consultation_id_user_id"
        ),
    )
    op.create_index("ix_team_members_user_id", "team_members", ["user_id"])

    op.create_table(
        "sessions",
        sa.Column("id", ID, nullable=False),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        _ts("started_at"),
        _ts("ended_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.ForeignKeyConstraint(
            ["consultation_id"], ["consultations.id"], name="fk_sessions_consultation_id"
        ),
        sa.UniqueConstraint("consultation_id", "number", name="uq_sessions_consultation_id_number"),
    )

    op.create_table(
        "participations",
        sa.Column("session_id", ID, nullable=False),
        sa.Column("participant_id", USER, nullable=False),
        sa.Column("user_id", USER, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("role", ENUM, nullable=False),
        sa.Column("device", NAME, nullable=False),
        _ts("joined_at"),
        _ts("left_at", nullable=True),
        sa.Column("close_reason", ENUM, nullable=True),
        sa.PrimaryKeyConstraint("session_id", "participant_id", name="pk_participations"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_participations_session_id"
        ),
    )

    op.create_table(
        "session_events",
        _id(),
        sa.Column("session_id", ID, nullable=False),
        _ts("at"),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("actor", USER, nullable=True),
        sa.Column("participant_id", USER, nullable=True),
        sa.Column("data", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_session_events"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_session_events_session_id"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_session_events_session_id", "session_events", ["session_id"])

    op.create_table(
        "consents",
        _id(),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=True),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("given_by", USER, nullable=False),
        sa.Column("on_behalf_of", NAME, nullable=False),
        _ts("at"),
        sa.PrimaryKeyConstraint("id", name="pk_consents"),
        sa.ForeignKeyConstraint(
            ["consultation_id"], ["consultations.id"], name="fk_consents_consultation_id"
        ),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_consents_session_id"),
    )
    op.create_index("ix_consents_consultation_id", "consents", ["consultation_id"])
    op.create_index("ix_consents_session_id", "consents", ["session_id"])

    op.create_table(
        "opinion_versions",
        _id(),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("findings", sa.Text(), nullable=False),
        sa.Column("assessment", sa.Text(), nullable=False),
        sa.Column("recommendations", sa.Text(), nullable=False),
        sa.Column("referral_advice", sa.Text(), nullable=False),
        sa.Column("author", USER, nullable=False),
        _ts("created_at"),
        sa.Column("amendment_reason", sa.Text(), nullable=True),
        sa.Column("content_hash", ID, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_opinion_versions"),
        sa.ForeignKeyConstraint(
            ["consultation_id"],
            ["consultations.id"],
            name="fk_opinion_versions_consultation_id",
        ),
        sa.UniqueConstraint(
            "consultation_id", "version", name="uq_opinion_versions_consultation_id_version"
        ),
    )

    op.create_table(
        "opinion_signatures",
        _id(),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("signer", USER, nullable=False),
        sa.Column("signer_name", NAME, nullable=False),
        sa.Column("signer_role", ENUM, nullable=False),
        _ts("signed_at"),
        sa.Column("content_hash", ID, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_opinion_signatures"),
        sa.ForeignKeyConstraint(
            ["consultation_id", "version"],
            ["opinion_versions.consultation_id", "opinion_versions.version"],
            name="fk_opinion_signatures_consultation_id",
        ),
        sa.UniqueConstraint(
            "consultation_id",
            "version",
            "signer",
            name="uq_opinion_signatures_consultation_id_version_signer",
        ),
    )

    op.create_table(
        "final_decisions",
        _id(),
        sa.Column("consultation_id", ID, nullable=False),
        sa.Column("decided_by", USER, nullable=False),
        sa.Column("decision", sa.Text(), nullable=False),
        _ts("at"),
        sa.PrimaryKeyConstraint("id", name="pk_final_decisions"),
        sa.ForeignKeyConstraint(
            ["consultation_id"],
            ["consultations.id"],
            name="fk_final_decisions_consultation_id",
        ),
    )
    op.create_index("ix_final_decisions_consultation_id", "final_decisions", ["consultation_id"])

    op.create_table(
        "recordings",
        sa.Column("id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("track", NAME, nullable=False),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("media_type", NAME, nullable=False),
        sa.Column("sha256", ID, nullable=True),
        sa.Column("duration_s", sa.Double(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("state", ENUM, nullable=False),
        _ts("started_at"),
        _ts("ended_at", nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_recordings"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_recordings_session_id"),
    )
    op.create_index("ix_recordings_session_id", "recordings", ["session_id"])

    op.create_table(
        "revoked_tokens",
        sa.Column("jti", USER, nullable=False),
        _ts("expires_at"),
        _ts("revoked_at"),
        sa.PrimaryKeyConstraint("jti", name="pk_revoked_tokens"),
    )
    op.create_index("ix_revoked_tokens_expires_at", "revoked_tokens", ["expires_at"])

    op.create_table(
        "audit_log",
        _id(),
        _ts("at"),
        sa.Column("actor", USER, nullable=False),
        sa.Column("actor_role", ENUM, nullable=False),
        sa.Column("action", ENUM, nullable=False),
        sa.Column("consultation_id", ID, nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("remote_addr", USER, nullable=True),
        sa.Column("detail", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_log_consultation_id", "audit_log", ["consultation_id"])


def downgrade() -> None:
    # Dependents first; dropping a table drops its indexes.
    for table in (
        "audit_log",
        "revoked_tokens",
        "recordings",
        "final_decisions",
        "opinion_signatures",
        "opinion_versions",
        "consents",
        "session_events",
        "participations",
        "sessions",
        "team_members",
        "consultations",
    ):
        op.drop_table(table)
