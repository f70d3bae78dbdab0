"""The signaling hot path straight on the driver: the revocation check of every connect, the
seat of every join and every chat message.

Through SQLAlchemy Core these cost more CPU than the work itself (statement building, result
mapping, the greenlet bridge, and on SQLite a thread hand-off per statement). Here each is one
transaction of plain statements: on SQLite one hop to a thread that runs the whole
transaction on its own connection, on PostgreSQL asyncpg's prepared statements on a small
pool of its own. The rows are exactly those server/db/store.py writes: the same columns, the
same stored forms (SQLAlchemy's own type processors, taken once per dialect) and the same hash
chain, locked the same way (chain.py).

Chat is group-committed: messages arriving while a chat transaction commits go together in
the next one, in arrival order. A message is acknowledged only once its transaction has
committed, so a crash loses nothing that was acknowledged."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
from sqlalchemy.engine import Dialect, RowMapping, make_url

from rooms.errors import Conflict, Unavailable
from rooms.model import (
    Consent,
    ConsentKind,
    Consultation,
    ConsultationId,
    EventKind,
    ParticipantId,
    Participation,
    SessionEvent,
    SessionId,
    UserId,
)
from rooms.store import NewEvent, SeatRecord
from server.db import chain
from server.db import mapping as m
from server.db.tables import UtcDateTime, consultations, session_events, team_members

log = logging.getLogger(__name__)

T = TypeVar("T")

UNAVAILABLE = "the record store is unavailable; try again shortly"
# A transaction of chats holds at most this many (bounds how long the write lock is held).
MAX_BATCH = 256
# Sessions whose consultation (their event chain) this process has looked up; a session never
# changes consultation, so the cache only needs a bound.
SESSION_CACHE = 10_000

_EVENT_INSERT_COLUMNS = "session_id, at, kind, actor, participant_id, data, prev_hash, hash"
_EVENT_COLUMNS = "id, session_id, at, kind, actor, participant_id, data"
_CONSENT_COLUMNS = "consultation_id, session_id, kind, granted, given_by, on_behalf_of, at"
_PARTICIPATION_COLUMNS = (
    "session_id, participant_id, user_id, name, role, device, joined_at, left_at, close_reason"
)
_TEAM_COLUMNS = ("user_id", "name", "role", "institution", "added_at")
# A consultation with its team in one statement (one consistent read, one round trip); the
# team in the order the store's _team reads it.
_CONSULTATION_QUERY = (
    f"SELECT {', '.join(f'c.{c.name}' for c in consultations.c)}, "
    f"{', '.join(f't.{c}' for c in _TEAM_COLUMNS)} "
    "FROM consultations c LEFT JOIN team_members t ON t.consultation_id = c.id "
    "WHERE c.id = {} ORDER BY t.added_at, t.id"
)


class HotPath(ABC):
    """One backend's statements; the group commit of chat is common to both."""

    def __init__(self, dialect: Dialect) -> None:
        # Stored forms as SQLAlchemy would write and read them for this dialect.
        at_type = UtcDateTime().dialect_impl(dialect)
        self._at_in = _bind(at_type.bind_processor(dialect))
        self._at_out = _bind(at_type.result_processor(dialect, None))
        data_type = session_events.c.data.type.dialect_impl(dialect)
        self._data_in = _bind(data_type.bind_processor(dialect))
        self._data_out: Callable[[Any], Any] = _bind(data_type.result_processor(dialect, None))
        # Result processors of the consultation's and team's columns, in query order.
        self._consultation_out = [
            _bind(c.type.dialect_impl(dialect).result_processor(dialect, None))
            for c in consultations.c
        ]
        self._team_out = [
            _bind(team_members.c[c].type.dialect_impl(dialect).result_processor(dialect, None))
            for c in _TEAM_COLUMNS
        ]
        self._consultation_of: dict[str, str] = {}
        self._queue: list[tuple[NewEvent, asyncio.Future[SessionEvent]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @abstractmethod
    async def start(self) -> None: ...

    async def stop(self) -> None:
        # Chats already taken are committed (or refused) before the connections go.
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    @abstractmethod
    async def is_token_revoked(self, jti: str) -> bool: ...

    @abstractmethod
    async def get_consultation(self, consultation_id: ConsultationId) -> Consultation | None: ...

    @abstractmethod
    async def seat(
        self, participation: Participation, joined: NewEvent, chat_limit: int
    ) -> SeatRecord: ...

    @abstractmethod
    async def _append(self, events: Sequence[NewEvent]) -> list[int]:
        """Appends `events` in one transaction; their seqs, in the same order."""

    async def append_chat(self, event: NewEvent) -> SessionEvent:
        done: asyncio.Future[SessionEvent] = asyncio.get_running_loop().create_future()
        self._queue.append((event, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="chat-commit")
        return await done

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._commit(batch)
                except BaseException:
                    # Cancelled (the server stopping): whether it committed is unknown, so
                    # none of these is acknowledged; their senders are told to try again.
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(Unavailable(UNAVAILABLE))
                    raise
        finally:
            self._flusher = None

    async def _commit(self, batch: list[tuple[NewEvent, asyncio.Future[SessionEvent]]]) -> None:
        events = [e for e, _ in batch]
        try:
            seqs = await self._append(events)
        except Unavailable:
            for _, done in batch:
                if not done.done():
                    done.set_exception(Unavailable(UNAVAILABLE))
            return
        except Exception as exc:
            if len(batch) > 1:
                # One bad event (a session that is gone) must not refuse the others.
                for one in batch:
                    await self._commit([one])
                return
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (event, done), seq in zip(batch, seqs, strict=True):
            if not done.done():  # its sender may have gone; the message is stored all the same
                done.set_result(_stored(event, seq))

    def _values(self, event: NewEvent) -> dict[str, Any]:
        """The row's fields as the chain hashes them (store.py's append_event)."""
        return {
            "session_id": event.session_id,
            "at": event.at,
            "kind": event.kind.value,
            "actor": event.actor,
            "participant_id": event.participant_id,
            "data": event.data,
        }

    def _participation_row(self, p: Participation) -> tuple[Any, ...]:
        """A participations row in the order of _PARTICIPATION_COLUMNS, as stored."""
        return (
            p.session_id,
            p.participant_id,
            p.user_id,
            p.name,
            p.role.value,
            p.device,
            self._at_in(p.joined_at),
            self._at_in(p.left_at),
            p.close_reason.value if p.close_reason is not None else None,
        )

    def _remember(self, session_id: str, consultation_id: str) -> None:
        if len(self._consultation_of) >= SESSION_CACHE:
            self._consultation_of.clear()
        self._consultation_of[session_id] = consultation_id

    def _event_from(self, row: Sequence[Any]) -> SessionEvent:
        actor, participant = row[4], row[5]
        return SessionEvent(
            session_id=SessionId(row[1]),
            seq=int(row[0]),
            at=self._at_out(row[2]),
            kind=EventKind(row[3]),
            actor=UserId(actor) if actor is not None else None,
            participant_id=ParticipantId(participant) if participant is not None else None,
            data=self._data_out(row[6]),
        )

    def _consultation_from(self, rows: Sequence[Sequence[Any]]) -> Consultation | None:
        if not rows:
            return None
        width = len(self._consultation_out)
        first = rows[0]
        row = {
            c.name: out(first[i])
            for i, (c, out) in enumerate(zip(consultations.c, self._consultation_out, strict=True))
        }
        team = [
            m.team_member_from_row(
                cast(
                    RowMapping,
                    {
                        name: out(r[width + i])
                        for i, (name, out) in enumerate(
                            zip(_TEAM_COLUMNS, self._team_out, strict=True)
                        )
                    },
                )
            )
            for r in rows
            if r[width] is not None
        ]
        return m.consultation_from_row(cast(RowMapping, row), team)

    def _consent_from(self, row: Sequence[Any]) -> Consent:
        return Consent(
            consultation_id=ConsultationId(row[0]),
            session_id=SessionId(row[1]) if row[1] is not None else None,
            kind=ConsentKind(row[2]),
            granted=bool(row[3]),
            given_by=UserId(row[4]),
            on_behalf_of=row[5],
            at=self._at_out(row[6]),
        )


def by_chain(
    events: Sequence[NewEvent], consultation_of: Callable[[str], str]
) -> list[tuple[str, list[int]]]:
    """The events' indexes per chain, in arrival order within a chain; chains sorted, so that
    every transaction locks chain heads in the same order (no deadlock on PostgreSQL)."""
    chains: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        name = chain.event_chain(consultation_of(event.session_id))
        chains.setdefault(name, []).append(i)
    return sorted(chains.items())


def _stored(event: NewEvent, seq: int) -> SessionEvent:
    return SessionEvent(
        session_id=event.session_id,
        seq=seq,
        at=event.at.astimezone(UTC),
        kind=event.kind,
        actor=event.actor,
        participant_id=event.participant_id,
        data=event.data,
    )


def _bind(processor: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    return processor if processor is not None else _same


def _same(value: Any) -> Any:
    return value


def _no_session(session_id: str) -> Conflict:
    return Conflict(f"event of session {session_id} refers to a record that does not exist")


def _duplicate_seat(p: Participation) -> str:
    return f"participant {p.participant_id} already joined session {p.session_id}"


# -- SQLite ------------------------------------------------------------------------------------

_SQLITE_UNIQUE = {1555, 2067}  # SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE


class SqliteHotPath(HotPath):
    """Two connections of its own, each used only from its own thread: one writes, one reads
    (so a read never queues behind a write). Writers take the store's writer lock (the same
    queue as the SQLAlchemy path's writers) and BEGIN IMMEDIATE (for other processes)."""

    def __init__(
        self, path: Path, dialect: Dialect, writer: asyncio.Lock, pragmas: Sequence[str]
    ) -> None:
        super().__init__(dialect)
        self._path = path
        self._writer = writer
        self._pragmas = pragmas
        self._threads: dict[bool, ThreadPoolExecutor] = {}
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []

    async def start(self) -> None:
        # The file is opened at the first use, as the engine does.
        self._threads = {
            write: ThreadPoolExecutor(1, thread_name_prefix=f"telemed-sqlite-{name}")
            for write, name in ((True, "write"), (False, "read"))
        }

    async def stop(self) -> None:
        await super().stop()
        threads, self._threads = self._threads, {}
        for thread in threads.values():
            thread.shutdown(wait=True)
        for conn in self._opened:
            conn.close()
        self._opened.clear()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened the first time."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: BEGIN is ours (see engine.py for why).
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in self._pragmas:
                    conn.execute(f"PRAGMA {pragma}")
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            self._opened.append(conn)
        return conn

    async def _run(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        thread = self._threads.get(write)
        if thread is None:
            raise RuntimeError("the SQLite hot path is not started")
        try:
            return await asyncio.get_running_loop().run_in_executor(thread, fn, *args)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode in _SQLITE_UNIQUE:
                raise Conflict("duplicate record") from exc
            raise Conflict("a record refers to a record that does not exist") from exc
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
            log.warning("the database is unavailable: %s", type(exc).__name__)
            raise Unavailable(UNAVAILABLE) from None

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `body` in one write transaction (in the thread)."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def is_token_revoked(self, jti: str) -> bool:
        return await self._run(self._revoked, jti)

    async def get_consultation(self, consultation_id: ConsultationId) -> Consultation | None:
        return await self._run(self._read_consultation, consultation_id)

    def _read_consultation(self, consultation_id: ConsultationId) -> Consultation | None:
        query = _CONSULTATION_QUERY.format("?")
        return self._consultation_from(self._db().execute(query, (consultation_id,)).fetchall())

    def _revoked(self, jti: str) -> bool:
        row = self._db().execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    async def _append(self, events: Sequence[NewEvent]) -> list[int]:
        async with self._writer:
            return await self._run(
                self._write, lambda conn: self._insert_events(conn, events), write=True
            )

    def _insert_events(self, conn: sqlite3.Connection, events: Sequence[NewEvent]) -> list[int]:
        seqs = [0] * len(events)
        for name, indexes in by_chain(events, lambda s: self._consultation(conn, s)):
            prev = self._lock_head(conn, name)
            for i in indexes:
                event = events[i]
                digest = chain.row_hash(prev, self._values(event), chain.EVENT_FIELDS)
                cursor = conn.execute(
                    f"INSERT INTO session_events ({_EVENT_INSERT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.session_id,
                        self._at_in(event.at),
                        event.kind.value,
                        event.actor,
                        event.participant_id,
                        self._data_in(event.data),
                        prev,
                        digest,
                    ),
                )
                assert cursor.lastrowid is not None
                seqs[i], prev = cursor.lastrowid, digest
            conn.execute(
                "UPDATE chain_heads SET head_hash = ?, head_seq = ? WHERE chain = ?",
                (prev, seqs[indexes[-1]], name),
            )
        return seqs

    def _consultation(self, conn: sqlite3.Connection, session_id: str) -> str:
        known = self._consultation_of.get(session_id)
        if known is not None:
            return known
        row = conn.execute("SELECT consultation_id FROM sessions WHERE id = ?", (session_id,))
        found = row.fetchone()
        if found is None:
            raise _no_session(session_id)
        self._remember(session_id, found[0])
        return str(found[0])

    @staticmethod
    def _lock_head(conn: sqlite3.Connection, name: str) -> str:
        # The write lock (BEGIN IMMEDIATE) already serialises appends.
        query = "SELECT head_hash FROM chain_heads WHERE chain = ?"
        row = conn.execute(query, (name,)).fetchone()
        if row is not None:
            return str(row[0])
        conn.execute(
            "INSERT INTO chain_heads (chain, head_hash, head_seq) VALUES (?, ?, 0)",
            (name, chain.GENESIS),
        )
        return chain.GENESIS

    async def seat(
        self, participation: Participation, joined: NewEvent, chat_limit: int
    ) -> SeatRecord:
        async with self._writer:
            return await self._run(
                self._write,
                lambda conn: self._seat_in(conn, participation, joined, chat_limit),
                write=True,
            )

    def _seat_in(
        self,
        conn: sqlite3.Connection,
        p: Participation,
        joined: NewEvent,
        chat_limit: int,
    ) -> SeatRecord:
        try:
            conn.execute(
                f"INSERT INTO participations ({_PARTICIPATION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._participation_row(p),
            )
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode in _SQLITE_UNIQUE:
                raise Conflict(_duplicate_seat(p)) from exc
            raise Conflict("participations row refers to a record that does not exist") from exc
        (seq,) = self._insert_events(conn, [joined])
        chat = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM session_events WHERE session_id = ? AND kind = ? "
            "ORDER BY id DESC LIMIT ?",
            (p.session_id, EventKind.CHAT.value, chat_limit),
        ).fetchall()
        consultation_id = self._consultation(conn, p.session_id)
        consents = conn.execute(
            f"SELECT {_CONSENT_COLUMNS} FROM consents WHERE consultation_id = ? ORDER BY at, id",
            (consultation_id,),
        ).fetchall()
        return SeatRecord(
            _stored(joined, seq),
            [self._event_from(row) for row in reversed(chat)],
            [self._consent_from(row) for row in consents],
        )


# -- PostgreSQL --------------------------------------------------------------------------------

# What a lost or refused connection looks like from asyncpg (the server restarting, stopped).
_PG_AWAY = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


_PG_INSERT_EVENT = (
    f"INSERT INTO session_events ({_EVENT_INSERT_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8) RETURNING id"
)
_PG_INSERT_LAST_EVENT = (
    f"WITH e AS (INSERT INTO session_events ({_EVENT_INSERT_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8) RETURNING id), "
    "h AS (UPDATE chain_heads SET head_hash = $8, head_seq = (SELECT id FROM e) "
    "WHERE chain = $9) "
    "SELECT id FROM e"
)
_PG_SEAT = (
    f"WITH p AS (INSERT INTO participations ({_PARTICIPATION_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)) "
    "SELECT head_hash FROM chain_heads WHERE chain = $10 FOR UPDATE"
)
# Rows tagged 0 (chat: id, session_id, at, kind, actor, participant_id, data) and 1 (consents:
# id, session_id, at, kind, given_by, on_behalf_of, -, granted).
_PG_SNAPSHOT = (
    "(SELECT 0 AS tag, id, session_id, at, kind, actor, participant_id, data, "
    "NULL::boolean AS granted FROM session_events WHERE session_id = $1 AND kind = $2 "
    "ORDER BY id DESC LIMIT $3) "
    "UNION ALL "
    "(SELECT 1, id, session_id, at, kind, given_by, on_behalf_of, NULL::jsonb, granted "
    "FROM consents WHERE consultation_id = $4)"
)


class PostgresHotPath(HotPath):
    """A small asyncpg pool of its own (no connection is opened before the first use)."""

    POOL_SIZE = 4

    def __init__(
        self, database_url: str, dialect: Dialect, connect_args: Mapping[str, Any]
    ) -> None:
        super().__init__(dialect)
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._connect_args = dict(connect_args)
        self._pool: Any = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=0, max_size=self.POOL_SIZE, timeout=10, **self._connect_args
        )

    async def stop(self) -> None:
        await super().stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _in_transaction(self, body: Callable[[Any], Any], *, read: bool = False) -> Any:
        """`body(connection)` in a transaction (`read`: one statement, needing none)."""
        if self._pool is None:
            raise RuntimeError("the PostgreSQL hot path is not started")
        try:
            async with self._pool.acquire() as conn:
                if read:
                    return await body(conn)
                async with conn.transaction():
                    return await body(conn)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict("duplicate record") from exc
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict("a record refers to a record that does not exist") from exc
        except _PG_AWAY as exc:
            log.warning("the database is unavailable: %s", type(exc).__name__)
            raise Unavailable(UNAVAILABLE) from None

    async def is_token_revoked(self, jti: str) -> bool:
        async def body(conn: Any) -> bool:
            found = await conn.fetchval("SELECT 1 FROM revoked_tokens WHERE jti = $1", jti)
            return found is not None

        revoked: bool = await self._in_transaction(body, read=True)
        return revoked

    async def get_consultation(self, consultation_id: ConsultationId) -> Consultation | None:
        async def body(conn: Any) -> Consultation | None:
            rows = await conn.fetch(_CONSULTATION_QUERY.format("$1"), consultation_id)
            return self._consultation_from(rows)

        found: Consultation | None = await self._in_transaction(body, read=True)
        return found

    async def _append(self, events: Sequence[NewEvent]) -> list[int]:
        async def body(conn: Any) -> list[int]:
            return await self._insert_events(conn, events)

        seqs: list[int] = await self._in_transaction(body)
        return seqs

    async def _insert_events(
        self, conn: Any, events: Sequence[NewEvent], locked: Mapping[str, str] | None = None
    ) -> list[int]:
        """`locked`: chain heads the transaction has already locked, with their hashes."""
        await self._look_up_sessions(conn, {e.session_id for e in events})
        seqs = [0] * len(events)
        for name, indexes in by_chain(events, self._consultation_of.__getitem__):
            prev = locked[name] if locked and name in locked else await self._lock_head(conn, name)
            for n, i in enumerate(indexes):
                event = events[i]
                digest = chain.row_hash(prev, self._values(event), chain.EVENT_FIELDS)
                row = (
                    event.session_id,
                    self._at_in(event.at),
                    event.kind.value,
                    event.actor,
                    event.participant_id,
                    json.dumps(event.data),
                    prev,
                    digest,
                )
                if n < len(indexes) - 1:
                    seqs[i] = await conn.fetchval(_PG_INSERT_EVENT, *row)
                else:
                    # The chain's last row moves its head in the same statement.
                    seqs[i] = await conn.fetchval(_PG_INSERT_LAST_EVENT, *row, name)
                prev = digest
        return seqs

    async def _look_up_sessions(self, conn: Any, session_ids: set[str]) -> None:
        for session_id in session_ids - self._consultation_of.keys():
            found = await conn.fetchval(
                "SELECT consultation_id FROM sessions WHERE id = $1", session_id
            )
            if found is None:
                raise _no_session(session_id)
            self._remember(session_id, found)

    @staticmethod
    async def _lock_head(conn: Any, name: str) -> str:
        query = "SELECT head_hash FROM chain_heads WHERE chain = $1 FOR UPDATE"
        head = await conn.fetchval(query, name)
        if head is None:
            await conn.execute(
                "INSERT INTO chain_heads (chain, head_hash, head_seq) VALUES ($1, $2, 0) "
                "ON CONFLICT (chain) DO NOTHING",
                name,
                chain.GENESIS,
            )
            head = await conn.fetchval(query, name)
        return str(head)

    async def seat(
        self, participation: Participation, joined: NewEvent, chat_limit: int
    ) -> SeatRecord:
        p = participation

        async def body(conn: Any) -> SeatRecord:
            await self._look_up_sessions(conn, {p.session_id})
            consultation_id = self._consultation_of[p.session_id]
            name = chain.event_chain(consultation_id)
            try:
                # The participation and the chain's head lock in one round trip.
                head = await conn.fetchval(
                    _PG_SEAT,
                    *self._participation_row(p),
                    name,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(_duplicate_seat(p)) from exc
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise Conflict("participations row refers to a record that does not exist") from exc
            locked = {name: head} if head is not None else None
            (seq,) = await self._insert_events(conn, [joined], locked)
            # The snapshot's chat and consents in one read (ordered here).
            rows = await conn.fetch(
                _PG_SNAPSHOT, p.session_id, EventKind.CHAT.value, chat_limit, consultation_id
            )
            chat = sorted((r for r in rows if r[0] == 0), key=lambda r: r[1])
            consents = sorted((r for r in rows if r[0] == 1), key=lambda r: (r[3], r[1]))
            return SeatRecord(
                _stored(joined, seq),
                [self._event_from(tuple(r)[1:8]) for r in chat],
                [
                    self._consent_from((consultation_id, r[2], r[4], r[8], r[5], r[6], r[3]))
                    for r in consents
                ],
            )

        record: SeatRecord = await self._in_transaction(body)
        return record

    def _event_from(self, row: Sequence[Any]) -> SessionEvent:
        # asyncpg hands jsonb over as text.
        values = tuple(row)
        return super()._event_from((*values[:6], json.loads(values[6])))


def create_hot_path(
    database_url: str,
    dialect: Dialect,
    *,
    sqlite_file: Path | None,
    writer: asyncio.Lock | None,
    pragmas: Sequence[str],
    connect_args: Mapping[str, Any],
) -> HotPath | None:
    """The hot path for this database, or None where the store's own path must do (an
    in-memory SQLite database, which a second connection would not see)."""
    if dialect.name == "postgresql":
        return PostgresHotPath(database_url, dialect, connect_args)
    if dialect.name == "sqlite" and sqlite_file is not None and writer is not None:
        return SqliteHotPath(sqlite_file, dialect, writer, pragmas)
    return None
