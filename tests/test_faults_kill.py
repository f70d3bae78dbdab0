"""`kill -9` of a real `telemed serve` while people join and while a session is live (the
recording phase has its own test in test_recording_server.py, rendering test_faults_render.py),
and of a `telemed retention run` half way,
then a restart on the same data directory: what the record says afterwards, field by field.

After the restart (embedded mode) every seat the log still showed is closed as `server_lost`,
in one entry each; the session stays open for the clinic to come back, and ends as `aborted`
if nobody does within the empty-room grace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from api_helpers import consultation_body
from pydantic import SecretStr
from recording_server_helpers import ServerProcess, telemed_command, write_config
from signaling_fixtures import (
    COUNTY,
    SPECIALIST,
    VILLAGE,
    DemoIdentity,
    Peer,
    SignalingServer,
    eventually,
    start_signaling_server,
)
from test_recording_server import rest
from test_retention import consultation as old_consultation
from test_retention import recording as old_recording

from rooms.model import (
    AuditAction,
    CloseReason,
    ConsultationId,
    ConsultationStatus,
    EventKind,
    Session,
    SessionEvent,
    SessionId,
)
from server.app import RECOVERY
from server.auth import TokenService
from server.config import JwtConfig, load_config
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore

pytest_plugins = ["signaling_fixtures"]

WAIT = 60.0


@dataclass
class Deployment:
    """A data directory with its config, and the secret its tokens are signed with."""

    tmp_path: Path
    config_file: Path
    data_dir: Path
    secret: str

    def token(self, who: DemoIdentity) -> str:
        tokens = TokenService(JwtConfig(secret=SecretStr(self.secret)))
        return tokens.mint(user_id=who.user_id, name=who.name, role=who.role, org=who.org)

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.data_dir / 'telemed.db'}"

    async def restart(self, **overrides: Any) -> SignalingServer:
        """The same deployment started again, in this process (to reach its objects)."""
        config = load_config(
            self.config_file, env={"TELEMED_JWT_SECRET": self.secret}, overrides=overrides
        )
        return await start_signaling_server(config)


def deployment(tmp_path: Path) -> Deployment:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config_file = tmp_path / "telemed.toml"
    write_config(config_file, data_dir)
    return Deployment(tmp_path, config_file, data_dir, secrets.token_urlsafe(36))


@contextlib.asynccontextmanager
async def served(d: Deployment) -> AsyncIterator[tuple[ServerProcess, list[Peer]]]:
    """A `telemed serve` child process; the test kills it. Peers made here are closed after."""
    process = ServerProcess(d.config_file, d.secret, d.tmp_path / "server.log")
    peers: list[Peer] = []
    try:
        await process.ready()
        yield process, peers
    finally:
        process.kill()
        for peer in peers:
            with contextlib.suppress(Exception):
                await peer.close()


async def scheduled_consultation(d: Deployment, url: str) -> tuple[str, str]:
    """A consultation scheduled over REST and a resident's invite token for it."""
    created = await rest(
        url, "POST", "/api/v1/consultations", d.token(VILLAGE), consultation_body()
    )
    cid = str(created["id"])
    await rest(url, "POST", f"/api/v1/consultations/{cid}/accept", d.token(COUNTY), {})
    when = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    body = {"scheduled_time": when}
    await rest(url, "POST", f"/api/v1/consultations/{cid}/schedule", d.token(COUNTY), body)
    invite = await rest(
        url, "POST", f"/api/v1/consultations/{cid}/invites", d.token(VILLAGE), {"role": "resident"}
    )
    return cid, str(invite["token"])


async def connected(url: str, peers: list[Peer], label: str, token: str) -> Peer:
    peer = Peer(url, label)
    peers.append(peer)
    await peer.connect({"token": token})
    return peer


async def log_of(d: Deployment, cid: str) -> list[SessionEvent]:
    """The session log straight from the database file (readable while a server writes it)."""
    store = SqlRecordStore(d.database_url)
    await store.start()
    try:
        async with store.reading() as tx:
            return await tx.list_events(ConsultationId(cid))
    finally:
        await store.stop()


def as_tuples(events: list[SessionEvent]) -> list[tuple[Any, ...]]:
    return [(e.seq, e.kind, e.participant_id, e.data) for e in events]


def present_at(events: list[SessionEvent]) -> set[str]:
    """Who the log shows in the room (seated or waiting)."""
    present: set[str] = set()
    for e in events:
        if e.participant_id is None:
            continue
        if e.kind in (EventKind.JOINED, EventKind.WAITING):
            present.add(e.participant_id)
        elif e.kind in (EventKind.LEFT, EventKind.DENIED):
            present.discard(e.participant_id)
    return present


async def check_seats_closed_by_recovery(
    server: SignalingServer, cid: str, at_kill: list[SessionEvent]
) -> list[SessionEvent]:
    """What the restart added: one `left` (server_lost) per participant the log still showed,
    nothing else; every participation ends, none without its `joined`. Returns the log."""
    events = await server.events(cid)
    assert as_tuples(events[: len(at_kill)]) == as_tuples(at_kill)
    added = events[len(at_kill) :]
    assert {e.kind for e in added} == {EventKind.LEFT}, [e.kind for e in added]
    assert all(e.data == {"reason": "server_lost"} and e.actor is None for e in added), added
    assert sorted(e.participant_id or "" for e in added) == sorted(present_at(at_kill))
    record = await server.record(cid)
    joined = {e.participant_id for e in events if e.kind == EventKind.JOINED}
    for p in record.participations:
        assert p.participant_id in joined, p  # nothing half-written
        assert p.left_at is not None, p
    lost = {
        p.participant_id for p in record.participations if p.close_reason is CloseReason.SERVER_LOST
    }
    assert lost == joined & present_at(at_kill), (lost, joined)
    return events


async def wait_for_recovery(server: SignalingServer) -> None:
    recovery = server.app[RECOVERY]
    await eventually(lambda: recovery.waiting == 0, "the recovery's wait to end", within=WAIT)


# --- joining ---------------------------------------------------------------------------------


async def test_kill_9_while_people_join(tmp_path: Path) -> None:
    d = deployment(tmp_path)
    async with served(d) as (process, peers):
        url = process.url
        cid, resident_token = await scheduled_consultation(d, url)
        village = await connected(url, peers, "village", d.token(VILLAGE))
        await village.join(cid)
        await village.wait_for("joined", within=WAIT)
        resident = await connected(url, peers, "resident", resident_token)
        await resident.join(cid)
        waiting = await resident.wait_for("waiting", within=WAIT)
        resident_pid = waiting["participant"]["participant_id"]
        # A burst of devices joining: the kill comes while some are half way.
        burst = [
            await connected(url, peers, f"specialist-{n}", d.token(SPECIALIST)) for n in range(8)
        ]
        joins = [
            asyncio.ensure_future(p.call("join", {"consultation_id": cid, "device": f"d{n}"}))
            for n, p in enumerate(burst)
        ]

        async def some_joined() -> bool:
            kinds = [e.kind for e in await log_of(d, cid)]
            return kinds.count(EventKind.JOINED) >= 2

        await eventually(some_joined, "the first joins recorded", within=WAIT)
        process.kill()
        for join in joins:
            join.cancel()
        await asyncio.gather(*joins, return_exceptions=True)
    at_kill = await log_of(d, cid)
    assert present_at(at_kill) >= {village.participant_id, resident_pid}

    server = await d.restart(**{"signaling.empty_room_grace_s": 1.0})
    try:
        events = await check_seats_closed_by_recovery(server, cid, at_kill)
        # Nobody comes back: after the grace the session ends as aborted, the consultation
        # waits for its opinion.
        await wait_for_recovery(server)
        record = await server.record(cid)
        (session,) = record.sessions
        assert session.end_reason == "aborted", session
        assert session.ended_at is not None
        ended = (await server.events(cid))[len(events) :]
        assert [(e.kind, e.data) for e in ended] == [
            (EventKind.SESSION_ENDED, {"reason": "aborted"})
        ]
        assert await server.status(cid) is ConsultationStatus.OPINION_PENDING
    finally:
        await server.close()


# --- live ------------------------------------------------------------------------------------


async def test_kill_9_in_a_live_session_and_the_clinic_comes_back(tmp_path: Path) -> None:
    d = deployment(tmp_path)
    async with served(d) as (process, peers):
        url = process.url
        cid, _ = await scheduled_consultation(d, url)
        village = await connected(url, peers, "village", d.token(VILLAGE))
        await village.join(cid)
        session_id = (await village.wait_for("joined", within=WAIT))["session_id"]
        county = await connected(url, peers, "county", d.token(COUNTY))
        await county.join(cid)
        await county.wait_for("joined", within=WAIT)
        await village.ok("chat", {"text": "血压 150/95"})
        await county.ok("chat", {"text": "请复测"})
        process.kill()
    at_kill = await log_of(d, cid)

    server = await d.restart(**{"signaling.empty_room_grace_s": 10.0})
    try:
        await check_seats_closed_by_recovery(server, cid, at_kill)
        # The village doctor's browser reconnects into the same session.
        back = await server.seated(VILLAGE, cid, label="village again")
        assert back.snapshot["session_id"] == session_id
        await back.ok("chat", {"text": "已复测 140/90"})
        await wait_for_recovery(server)
        (session,) = (await server.record(cid)).sessions
        assert session.ended_at is None, "someone came back: the session goes on"
        await back.ok("end_session")
        record = await server.record(cid)
        (session,) = record.sessions
        assert session.end_reason == "ended"
        events = record.events
        chats = [e.data["text"] for e in events if e.kind == EventKind.CHAT]
        assert chats == ["血压 150/95", "请复测", "已复测 140/90"]
        after = [(e.kind, e.data.get("reason")) for e in events[len(at_kill) :]]
        assert after == [
            (EventKind.LEFT, "server_lost"),
            (EventKind.LEFT, "server_lost"),
            (EventKind.JOINED, None),
            (EventKind.CHAT, None),
            (EventKind.SESSION_ENDED, "ended"),
        ], after
    finally:
        await server.close()


# --- a retention run --------------------------------------------------------------------------

EXPIRED = 300


async def test_kill_9_during_a_retention_run_leaves_each_record_whole_or_gone(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    url = f"sqlite+aiosqlite:///{data / 'telemed.db'}"
    await upgrade(url)
    store = SqlRecordStore(url)
    await store.start()
    try:
        (data / "recordings").mkdir(parents=True)
        cids = [f"old-{n:04d}" for n in range(EXPIRED)]
        async with store.transaction() as tx:
            for cid in cids:
                closed = datetime(2025, 1, 1, 8, tzinfo=UTC)
                await tx.add_consultation(
                    old_consultation(cid, ConsultationStatus.ARCHIVED, closed)
                )
                sid = SessionId(f"s-{cid}")
                await tx.add_session(Session(sid, ConsultationId(cid), 1, closed, closed))
                (data / "recordings" / f"rec-{cid}.webm").write_bytes(b"webm")
                await tx.add_recording(
                    old_recording(f"rec-{cid}", sid, closed), path=f"recordings/rec-{cid}.webm"
                )

        async def destroyed() -> set[str]:
            async with store.reading() as tx:
                entries = await tx.list_audit(None, 10 * EXPIRED, 0)
            return {
                str(e.consultation_id)
                for e in entries
                if e.action is AuditAction.DESTROY and e.target == "record"
            }

        run = retention_run(data)
        try:
            await eventually(
                lambda: _at_least(destroyed, 3), "the first records destroyed", within=WAIT
            )
            run.kill()
            run.wait()
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == -9, "the run had finished before it could be killed"

        gone = await destroyed()
        assert 3 <= len(gone) < EXPIRED, len(gone)
        missing_files = []
        async with store.reading() as tx:
            kept = {
                cid: (
                    await tx.get_consultation(ConsultationId(cid)),
                    await tx.list_recordings(ConsultationId(cid)),
                )
                for cid in cids
            }
        for cid, (found, recordings) in kept.items():
            file = data / "recordings" / f"rec-{cid}.webm"
            if cid in gone:
                assert found is None and not file.exists(), cid
            else:
                # Whole: the consultation, its recording row; its file unless the kill fell
                # inside its transaction (the file is deleted first, the row at the commit).
                assert found is not None, cid
                assert [r.id for r in recordings] == [f"rec-{cid}"], cid
                if not file.exists():
                    missing_files.append(cid)
        assert len(missing_files) <= 1, missing_files

        again = await asyncio.to_thread(
            subprocess.run,
            retention_argv(),
            env=retention_env(data),
            capture_output=True,
            text=True,
        )
        assert again.returncode == 0, again.stderr
        assert await destroyed() == set(cids)
        async with store.reading() as tx:
            entries = await tx.list_audit(None, 10 * EXPIRED, 0)
        records = [e for e in entries if e.action is AuditAction.DESTROY and e.target == "record"]
        assert len(records) == EXPIRED, "one destruction entry per record, none twice"
        for cid in missing_files:
            (entry,) = [e for e in records if e.consultation_id == cid]
            assert entry.detail["recordings"][0]["file"] == "already gone", entry
        assert list((data / "recordings").iterdir()) == []
    finally:
        await store.stop()


async def _at_least(count: Callable[[], Awaitable[set[str]]], n: int) -> bool:
    return len(await count()) >= n


def retention_argv() -> list[str]:
    return [*telemed_command(), "retention", "run", "--now", "2041-01-01T08:00:00+08:00"]


def retention_env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    return env | {"TELEMED_DATA_DIR": str(data)}


def retention_run(data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        retention_argv(),
        env=retention_env(data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
