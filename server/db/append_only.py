"""The database's own refusal to change the append-only tables (installed by migration 0004).

Triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) on the session event log and
the audit log, except a DELETE while the `retention_marker` table holds a row, which only
server/db/retention.py inserts, and deletes again, inside its transaction."""

from __future__ import annotations

APPEND_ONLY_TABLES = ("session_events", "audit_log")

PG_FUNCTION = """
CREATE FUNCTION telemed_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM retention_marker) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'telemed: % is append-only: % refused', TG_TABLE_NAME, TG_OP;
END
$$
"""


def pg_triggers(table: str) -> tuple[str, ...]:
    return (
        f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION telemed_append_only()",
        f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION telemed_append_only()",
    )


def sqlite_triggers(table: str) -> tuple[str, ...]:
    # SQLite has no TRUNCATE; a DELETE without WHERE fires these triggers too.
    return (
        f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} BEGIN "
        f"SELECT RAISE(ABORT, 'telemed: {table} is append-only: UPDATE refused'); END",
        f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
        "WHEN NOT EXISTS (SELECT 1 FROM retention_marker) BEGIN "
        f"SELECT RAISE(ABORT, 'telemed: {table} is append-only: DELETE refused'); END",
    )


def sqlite_trigger_names(table: str) -> tuple[str, ...]:
    return (f"{table}_no_update", f"{table}_no_delete")
