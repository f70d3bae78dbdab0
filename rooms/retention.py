"""Retention rules: how long each kind of artifact is kept, what counts as expired, legal holds.

Periods are calendar periods (15 years from 29 February is 28 February), never a number of
days, because the rules they implement are written in years and months."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rooms.model import AuditAction, ConsultationId, ConsultationStatus, UserId

_PART = re.compile(r"\s*(\d+)\s*(years?|y|months?|mo|days?|d)\s*", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Period:
    years: int = 0
    months: int = 0
    days: int = 0

    @classmethod
    def parse(cls, text: str) -> Period:
        """Reads e.g. "15y", "15 years", "6mo", "6 months", "180d", or several: "1y 6mo"."""
        years = months = days = 0
        pos = 0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            pos = match.end()
            n, unit = int(match.group(1)), match.group(2).lower()
            if unit.startswith("y"):
                years += n
            elif unit.startswith("mo"):
                months += n
            else:
                days += n
        if pos != len(text) or not text.strip():
            raise ValueError(
                f"{text!r} is not a period: write e.g. '15y', '6mo', '180d' or '1y 6mo'"
            )
        period = cls(years, months, days)
        if period == cls():
            raise ValueError(f"{text!r} is an empty period")
        return period

    def before(self, at: datetime) -> datetime:
        """The instant this period before `at` (the cut-off: older than this has expired)."""
        month_index = at.year * 12 + (at.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        day = min(at.day, calendar.monthrange(year, month + 1)[1])
        return at.replace(year=year, month=month + 1, day=day) - timedelta(days=self.days)

    def at_least(self, other: Period) -> bool:
        """Whether this period is as long as `other` wherever it is counted from."""
        reference = datetime(2000, 3, 1, tzinfo=UTC)
        return self.before(reference) <= other.before(reference)

    def __str__(self) -> str:
        parts = [
            f"{n} {unit}{'s' if n != 1 else ''}"
            for n, unit in ((self.years, "year"), (self.months, "month"), (self.days, "day"))
            if n
        ]
        return " ".join(parts)


@dataclass(frozen=True)
class RetentionPeriods:
    # The whole record of a closed consultation, counted from when it was closed.
    records: Period
    # Recording files (and their rows), counted from the end of each recording.
    recordings: Period
    # Entries of the audit log that record an access (views, exports, downloads).
    access_logs: Period


# What the rules ask as a minimum (see docs/domain.md): outpatient records 15 years,
# audio/video of internet care 3 years, access logs 6 months.
LEGAL_MINIMUM = RetentionPeriods(records=Period(15), recordings=Period(3), access_logs=Period(0, 6))

# Audit entries that record an access to the record; they expire with the access-log period.
ACCESS_ACTIONS = frozenset(
    {
        AuditAction.VIEW_CONSULTATION,
        AuditAction.VIEW_RECORD,
        AuditAction.EXPORT_RECORD,
        AuditAction.DOWNLOAD_RECORDING,
        AuditAction.VIEW_ATTACHMENT,
        AuditAction.DOWNLOAD_ATTACHMENT,
        AuditAction.VIEW_AUDIT,
        AuditAction.VERIFY_RECORD,
    }
)
# Kept for ever: the destruction log is what proves that destruction followed the rules.
NEVER_PURGED = frozenset({AuditAction.DESTROY})

# A consultation in one of these states is over; its record's period runs from updated_at
# (the moment it got there). A signed consultation is not: amendments may still follow.
CLOSED = frozenset(
    {
        ConsultationStatus.ARCHIVED,
        ConsultationStatus.DECLINED,
        ConsultationStatus.CANCELLED,
        ConsultationStatus.ABORTED,
    }
)

# Recordings still being written or rendered are never expired, however old.
UNFINISHED_RECORDING_STATES = frozenset({"recording", "rendering"})

# Who destruction entries in the audit log name as the actor.
RETENTION_ACTOR = UserId("telemed-retention")


@dataclass(frozen=True)
class LegalHold:
    """While a consultation is on hold nothing of it is destroyed, whatever its age."""

    consultation_id: ConsultationId
    reason: str
    placed_by: UserId
    placed_at: datetime
