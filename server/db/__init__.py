"""The durable record in SQL: tables, migrations and the RecordStore implementation."""

from server.db.migrate import downgrade_to_base, upgrade, upgrade_sync
from server.db.store import SqlRecordRepository, SqlRecordStore

__all__ = [
    "SqlRecordRepository",
    "SqlRecordStore",
    "downgrade_to_base",
    "upgrade",
    "upgrade_sync",
]
