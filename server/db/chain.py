"""Hash chains over the append-only tables: one per consultation over its session events, one
over the whole audit log.

Each row stores `prev_hash` (the chain's hash before it) and `hash` = SHA-256 of a canonical
JSON form of its fields and `prev_hash`. `chain_heads` holds each chain's newest hash; an
append locks that row first (SELECT ... FOR UPDATE on PostgreSQL; SQLite's writers are
serialised, see engine.py), so two appends cannot both extend the same hash.

Retention may delete rows (server/db/retention.py): a destroyed record takes its whole event
chain, whose head hash its `destroy` entry keeps; purged audit entries leave gaps, which their
`destroy` entry describes as runs (`chain_runs`: first and last seq, the hash before the run
and the run's last hash), so verification can bridge a gap that retention made and only that."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from rooms.model import AuditAction, ConsultationId
from server.db.tables import audit_log, chain_heads, session_events, sessions

GENESIS = "0" * 64
AUDIT_CHAIN = "audit"
# What each table's hash covers, besides prev_hash (the id is not: it is assigned on insert,
# and the order is what the links keep).
EVENT_FIELDS = ("session_id", "at", "kind", "actor", "participant_id", "data")
AUDIT_FIELDS = (
    "at",
    "actor",
    "actor_role",
    "action",
    "consultation_id",
    "target",
    "remote_addr",
    "detail",
)


def event_chain(consultation_id: str) -> str:
    return f"events:{consultation_id}"


def row_hash(prev_hash: str, values: Mapping[str, Any] | RowMapping, fields: Sequence[str]) -> str:
    """SHA-256 (hex) of the sorted-key JSON of `fields` of `values` and `prev_hash`."""
    body = {"prev_hash": prev_hash, **{name: values[name] for name in fields}}
    canonical = json.dumps(
        body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_plain
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"{type(value).__name__} has no canonical form in the chain")


async def lock_head(conn: AsyncConnection, chain: str) -> str:
    """The chain's newest hash (GENESIS for a new chain), its row locked until commit."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(
        dialect_insert(chain_heads)
        .values(chain=chain, head_hash=GENESIS, head_seq=0)
        .on_conflict_do_nothing(index_elements=[chain_heads.c.chain])
    )
    head = await conn.scalar(
        select(chain_heads.c.head_hash).where(chain_heads.c.chain == chain).with_for_update()
    )
    assert head is not None
    return str(head)


async def move_head(conn: AsyncConnection, chain: str, head_hash: str, seq: int) -> None:
    await conn.execute(
        update(chain_heads)
        .where(chain_heads.c.chain == chain)
        .values(head_hash=head_hash, head_seq=seq)
    )


async def read_head(conn: AsyncConnection, chain: str) -> tuple[str, int] | None:
    row = (
        await conn.execute(
            select(chain_heads.c.head_hash, chain_heads.c.head_seq).where(
                chain_heads.c.chain == chain
            )
        )
    ).one_or_none()
    return (row[0], row[1]) if row is not None else None


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One place where a chain does not hold: the row (seq; 0 for the head), what is wrong,
    what the chain expects there and what is found."""

    seq: int
    problem: str
    expected: str
    found: str
    consultation_id: str | None = None


@dataclass(frozen=True)
class ChainRun:
    """Consecutive rows of a chain that retention deleted."""

    first_seq: int
    last_seq: int
    prev_hash: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def runs_of(rows: Iterable[RowMapping]) -> list[ChainRun]:
    """The rows about to be deleted (in seq order) as chain runs: a run ends where the next
    row does not link to it."""
    runs: list[ChainRun] = []
    for row in rows:
        last = runs[-1] if runs else None
        if last is not None and row["prev_hash"] == last.hash:
            runs[-1] = ChainRun(last.first_seq, row["id"], last.prev_hash, row["hash"])
        else:
            runs.append(ChainRun(row["id"], row["id"], row["prev_hash"], row["hash"]))
    return runs


async def verify_events(
    conn: AsyncConnection, consultation_id: ConsultationId
) -> list[ChainProblem]:
    """Checks the consultation's event chain: each row's hash, each link, and the head."""
    e = session_events.c
    rows = (
        (
            await conn.execute(
                select(session_events, sessions.c.consultation_id)
                .join(sessions, sessions.c.id == e.session_id)
                .where(sessions.c.consultation_id == consultation_id)
                .order_by(e.id)
            )
        )
        .mappings()
        .all()
    )
    problems, last = _walk(rows, EVENT_FIELDS, [], "event")
    problems += _check_head(await read_head(conn, event_chain(consultation_id)), last, "event")
    return problems


async def verify_audit(conn: AsyncConnection) -> list[ChainProblem]:
    """Checks the whole audit chain, bridging only the gaps that `destroy` entries describe."""
    rows = (await conn.execute(select(audit_log).order_by(audit_log.c.id))).mappings().all()
    runs: list[ChainRun] = []
    for row in rows:
        if row["action"] == AuditAction.DESTROY.value:
            runs += [ChainRun(**run) for run in (row["detail"] or {}).get("chain_runs", [])]
    problems, last = _walk(
        rows, AUDIT_FIELDS, sorted(runs, key=lambda r: r.first_seq), "audit entry"
    )
    problems += _check_head(await read_head(conn, AUDIT_CHAIN), last, "audit entry")
    return problems


async def count_audit(conn: AsyncConnection) -> int:
    return int(await conn.scalar(select(func.count()).select_from(audit_log)) or 0)


def _walk(
    rows: Sequence[RowMapping], fields: Sequence[str], runs: Sequence[ChainRun], what: str
) -> tuple[list[ChainProblem], RowMapping | None]:
    problems: list[ChainProblem] = []
    expected, previous_seq, next_run = GENESIS, 0, 0
    last: RowMapping | None = None
    for row in rows:
        seq, cid = row["id"], row["consultation_id"]
        # Gaps retention made between the previous row and this one, oldest first.
        bridged = expected
        while next_run < len(runs) and runs[next_run].first_seq < seq:
            run = runs[next_run]
            if run.first_seq > previous_seq and run.prev_hash == bridged:
                bridged = run.hash
            next_run += 1
        if row["prev_hash"] not in (expected, bridged):
            problems.append(
                ChainProblem(
                    seq,
                    f"{what} {seq} does not link to the one before it (a row removed, "
                    "inserted or reordered)",
                    expected if bridged == expected else f"{expected} or {bridged}",
                    row["prev_hash"],
                    cid,
                )
            )
        computed = row_hash(row["prev_hash"], row, fields)
        if computed != row["hash"]:
            problems.append(
                ChainProblem(
                    seq,
                    f"{what} {seq} was changed: its content does not match its hash",
                    row["hash"],
                    computed,
                    cid,
                )
            )
        expected, previous_seq, last = row["hash"], seq, row
    return problems, last


def _check_head(
    head: tuple[str, int] | None, last: RowMapping | None, what: str
) -> list[ChainProblem]:
    if last is None:
        if head is None or head[1] == 0:
            return []
        return [
            ChainProblem(
                0, f"the chain head names {what} {head[1]}, but there are none", head[0], ""
            )
        ]
    if head is None or head != (last["hash"], last["id"]):
        named = f"{head[0]} (seq {head[1]})" if head else "no head"
        return [
            ChainProblem(
                0,
                f"the chain head does not name the newest {what} {last['id']} (later rows "
                "removed, or the head rewritten)",
                named,
                f"{last['hash']} (seq {last['id']})",
                last["consultation_id"],
            )
        ]
    return []
