"""The schema of the consultation record, as SQLAlchemy Core tables.

The alembic migrations under server/migrations create exactly this; a test compares the two.
Enums are stored as their string values; every datetime is UTC-aware on the way in and out."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# Explicit constraint names, so migrations can name (and later drop or alter) every one.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# BIGINT on PostgreSQL; on SQLite only a column declared exactly INTEGER PRIMARY KEY is the
# rowid and autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL (indexable, compact); JSON text elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")

# Column sizes: identifiers and enum values are short; free text is TEXT.
ID = 64
USER = 128
NAME = 200
ENUM = 32


class UtcDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that hands the domain UTC-aware datetimes on every backend.

    SQLite stores the value without an offset, so it is converted to UTC before writing and
    marked as UTC when read. Naive datetimes are refused: their meaning would be a guess."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the record stores only aware datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _id_pk() -> Column[int]:
    return Column("id", BigId, primary_key=True, autoincrement=True)


def _consultation_fk(nullable: bool = False) -> Column[str]:
    return Column("consultation_id", String(ID), ForeignKey("consultations.id"), nullable=nullable)


consultations = Table(
    "consultations",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("kind", String(ENUM), nullable=False),
    Column("specialty", String(NAME), nullable=False),
    Column("resident_pseudonym", String(USER), nullable=False),
    Column("resident_name", String(NAME), nullable=False),
    Column("resident_age", Integer, nullable=False),
    Column("resident_sex", String(ENUM), nullable=False),
    Column("inviting_institution", String(NAME), nullable=False),
    Column("inviting_clinician", String(USER), nullable=False),
    Column("reason", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("case_summary", Text, nullable=False),
    Column("requested_specialty", String(NAME), nullable=False),
    Column("requested_title", String(NAME), nullable=False),
    Column("preferred_time", UtcDateTime, nullable=True),
    Column("scheduled_time", UtcDateTime, nullable=True),
    Column("status", String(ENUM), nullable=False),
    Column("status_reason", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "status"),
    Index(None, "created_at"),
    Index(None, "inviting_institution"),
)

team_members = Table(
    "team_members",
    metadata,
    _id_pk(),
    _consultation_fk(),
    Column("user_id", String(USER), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("role", String(ENUM), nullable=False),
    Column("institution", String(NAME), nullable=False),
    Column("added_at", UtcDateTime, nullable=False),
    # Also serves as the index on the foreign key (its leading column).
    UniqueConstraint("consultation_id", "user_id"),
    Index(None, "user_id"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(ID), primary_key=True),
    _consultation_fk(),
    Column("number", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("end_reason", String(ENUM), nullable=True),
    UniqueConstraint("consultation_id", "number"),
)

participations = Table(
    "participations",
    metadata,
    Column("session_id", String(ID), ForeignKey("sessions.id"), primary_key=True),
    Column("participant_id", String(USER), primary_key=True),
    Column("user_id", String(USER), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("role", String(ENUM), nullable=False),
    Column("device", String(NAME), nullable=False),
    Column("joined_at", UtcDateTime, nullable=False),
    Column("left_at", UtcDateTime, nullable=True),
    Column("close_reason", String(ENUM), nullable=True),
)

# SHA-256 hex digests: the chain columns of the append-only tables (server/db/chain.py).
HASH = 64


def _chain_columns() -> tuple[Column[str], Column[str]]:
    return (
        Column("prev_hash", String(HASH), nullable=False),
        Column("hash", String(HASH), nullable=False),
    )


# Append-only, enforced by triggers (migration 0004): only retention deletes, through the
# marker below. Each row holds the hash of the consultation's previous event (a chain per
# consultation). `id` is the event's seq; AUTOINCREMENT on SQLite so a seq is never reused.
session_events = Table(
    "session_events",
    metadata,
    _id_pk(),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(ENUM), nullable=False),
    Column("actor", String(USER), nullable=True),
    Column("participant_id", String(USER), nullable=True),
    Column("data", Json, nullable=False),
    *_chain_columns(),
    Index(None, "session_id"),
    sqlite_autoincrement=True,
)

consents = Table(
    "consents",
    metadata,
    _id_pk(),
    _consultation_fk(),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=True),
    Column("kind", String(ENUM), nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("given_by", String(USER), nullable=False),
    Column("on_behalf_of", String(NAME), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index(None, "consultation_id"),
    Index(None, "session_id"),
)

opinion_versions = Table(
    "opinion_versions",
    metadata,
    _id_pk(),
    _consultation_fk(),
    Column("version", Integer, nullable=False),
    Column("findings", Text, nullable=False),
    Column("assessment", Text, nullable=False),
    Column("recommendations", Text, nullable=False),
    Column("referral_advice", Text, nullable=False),
    Column("author", String(USER), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("amendment_reason", Text, nullable=True),
    Column("content_hash", String(ID), nullable=False),
    UniqueConstraint("consultation_id", "version"),
)

opinion_signatures = Table(
    "opinion_signatures",
    metadata,
    _id_pk(),
    Column("consultation_id", String(ID), nullable=False),
    Column("version", Integer, nullable=False),
    Column("signer", String(USER), nullable=False),
    Column("signer_name", String(NAME), nullable=False),
    Column("signer_role", String(ENUM), nullable=False),
    Column("signed_at", UtcDateTime, nullable=False),
    Column("content_hash", String(ID), nullable=False),
    # Ed25519 (base64) over rooms.opinion.signed_form and the signing key's id; NULL for
    # signatures made before migration 0005 (which had only the content hash).
    Column("key_id", String(ID), nullable=True),
    Column("signature", Text, nullable=True),
    # A signature belongs to one existing version; signing twice is refused by the database.
    ForeignKeyConstraint(
        ["consultation_id", "version"],
        ["opinion_versions.consultation_id", "opinion_versions.version"],
    ),
    UniqueConstraint("consultation_id", "version", "signer"),
)

final_decisions = Table(
    "final_decisions",
    metadata,
    _id_pk(),
    _consultation_fk(),
    Column("decided_by", String(USER), nullable=False),
    Column("decision", Text, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index(None, "consultation_id"),
)

recordings = Table(
    "recordings",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=False),
    Column("track", String(NAME), nullable=False),
    Column("kind", String(ENUM), nullable=False),
    Column("media_type", String(NAME), nullable=False),
    Column("sha256", String(ID), nullable=True),
    Column("duration_s", Double, nullable=True),
    Column("size_bytes", BigInteger, nullable=True),
    Column("state", String(ENUM), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    # Where the media file lives, relative to the data directory; never shown to clients.
    Column("path", Text, nullable=True),
    Column("participant_id", String(ID), nullable=True),
    Column("name", String(NAME), nullable=True),
    Column("role", String(ENUM), nullable=True),
    Column("source", String(ENUM), nullable=True),
    Column("offset_s", Double, nullable=True),
    Column("progress", Double, nullable=True),
    Column("node", String(NAME), nullable=True),
    Index(None, "session_id"),
    Index(None, "state"),
)

# Files in the record (rooms/attachments.py); rows are never updated. The file is sealed
# under the data directory like a recording's; its path is never shown to clients.
attachments = Table(
    "attachments",
    metadata,
    Column("id", String(ID), primary_key=True),
    _consultation_fk(),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=True),
    Column("kind", String(ENUM), nullable=False),
    Column("media_type", String(NAME), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(HASH), nullable=False),
    Column("path", Text, nullable=False),
    Column("filename", String(NAME), nullable=True),
    Column("description", Text, nullable=True),
    Column("added_by", String(USER), nullable=False),
    Column("added_by_name", String(NAME), nullable=False),
    Column("added_by_role", String(ENUM), nullable=False),
    Column("added_at", UtcDateTime, nullable=False),
    Column("taken_at", UtcDateTime, nullable=True),
    Column("track", String(NAME), nullable=True),
    Index(None, "consultation_id"),
    Index(None, "session_id"),
)

revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("jti", String(USER), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=False),
    # For purging entries whose token has expired anyway.
    Index(None, "expires_at"),
)

# Short invite codes (rooms/invite_codes.py): an HMAC of each, never the code. No foreign key:
# like revoked_tokens, rows go when they expire, whatever happens to the consultation.
invite_codes = Table(
    "invite_codes",
    metadata,
    Column("code_hash", String(HASH), primary_key=True),
    Column("consultation_id", String(ID), nullable=False),
    Column("jti", String(USER), nullable=False),
    Column("user_id", String(USER), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("role", String(ENUM), nullable=False),
    Column("org", String(NAME), nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index(None, "expires_at"),
)

# Append-only, like session_events, and one chain over all rows. No foreign key on
# consultation_id: the trail must outlive a consultation's record (retention may destroy the
# record, never its audit).
audit_log = Table(
    "audit_log",
    metadata,
    _id_pk(),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(USER), nullable=False),
    Column("actor_role", String(ENUM), nullable=False),
    Column("action", String(ENUM), nullable=False),
    Column("consultation_id", String(ID), nullable=True),
    Column("target", Text, nullable=True),
    Column("remote_addr", String(USER), nullable=True),
    Column("detail", Json, nullable=False),
    *_chain_columns(),
    Index(None, "consultation_id"),
    sqlite_autoincrement=True,
)

# The newest hash of each chain ("audit", "events:<consultation>"), updated in the transaction
# that appends; its row is locked first (SELECT ... FOR UPDATE) so two appends cannot fork it.
chain_heads = Table(
    "chain_heads",
    metadata,
    Column("chain", String(96), primary_key=True),
    Column("head_hash", String(HASH), nullable=False),
    Column("head_seq", BigInteger, nullable=False),
)

# Holds a row only inside a retention transaction, which inserts and deletes it around its
# deletes: the append-only triggers let a DELETE through only while it is there. Never
# committed with a row, so no other transaction ever sees one (server/db/retention.py).
retention_marker = Table(
    "retention_marker",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
)

# Legal holds, placed and released; a released hold stays as history (released_* set). No
# foreign key, like the audit log: the history of holds outlives a record destroyed later.
legal_holds = Table(
    "legal_holds",
    metadata,
    _id_pk(),
    Column("consultation_id", String(ID), nullable=False),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(USER), nullable=False),
    Column("placed_at", UtcDateTime, nullable=False),
    Column("released_by", String(USER), nullable=True),
    Column("released_at", UtcDateTime, nullable=True),
    Column("release_reason", Text, nullable=True),
    Index(None, "consultation_id"),
)
