"""Several nodes behind one Redis and one database (as docker-compose.yml runs them): a
playback link made on one node plays on the other and after a restart (signed with the
configured key), and what a dead worker was writing is closed by one live worker — and only
that. Real aiohttp apps on ephemeral ports, a private redis-server, one SQLite file."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from recording_helpers import ManualClock, opus_frames, record_track
from recording_server_helpers import sha256_of
from signaling_fixtures import (
    SPECIALIST,
    VILLAGE,
    SignalingServer,
    eventually,
    start_signaling_server,
)

from media.recording import DiskWriter
from media.sealed import SealedWriter
from rooms.consultations import RequestContext
from rooms.model import (
    ConsultationId,
    ConsultationStatus,
    EventKind,
    Recording,
    RecordingId,
    RecordingKind,
    RecordingState,
    SessionId,
)
from rooms.roles import Role
from server.app import CONFIG, PLACEMENT, RECORDING_KEYS, RECORDINGS, STORE
from server.config import load_config
from server.takeover import TAKEOVER

pytest_plugins = ["signaling_fixtures", "redis_fixtures"]

Start = Callable[[str], Awaitable[SignalingServer]]


@pytest.fixture
async def start_node(tmp_path: Path, redis_url: str) -> AsyncIterator[Start]:
    """Starts a node named `node_id` on the shared database, data directory and Redis; every
    node still running is stopped after the test."""
    running: list[SignalingServer] = []

    async def start(node_id: str) -> SignalingServer:
        config = load_config(
            env={},
            overrides={
                "dev": True,
                "data_dir": str(tmp_path),
                "redis_url": redis_url,
                "node_id": node_id,
            },
        )
        server = await start_signaling_server(config)
        running.append(server)
        return server

    yield start
    for server in running:
        await server.close()


async def stop(server: SignalingServer) -> None:
    """A node that stops (its cleanup runs once: the fixture skips a node stopped here)."""
    await server.close()


async def live_session(server: SignalingServer) -> tuple[str, str]:
    consultation = await server.scheduled()
    session = await server.service.start_session(RequestContext(VILLAGE.actor()), consultation.id)
    return consultation.id, session.id


async def add_file(
    server: SignalingServer, session_id: str, data: bytes, state: RecordingState, node: str
) -> str:
    recording_id = f"rec_{secrets.token_hex(8)}"
    relative = f"recordings/{session_id}/{recording_id}.webm"
    path: Path = server.app[CONFIG].data_dir / relative
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)

    def seal() -> None:
        with SealedWriter(path, server.app[RECORDING_KEYS]) as sealed:
            sealed.write(data)

    await asyncio.to_thread(seal)
    now = datetime.now(UTC)
    done = state is not RecordingState.RECORDING
    row = Recording(
        id=RecordingId(recording_id),
        session_id=SessionId(session_id),
        track="t-video",
        kind=RecordingKind.TRACK.value,
        media_type="video/webm",
        sha256=None,
        duration_s=1.0 if done else None,
        size_bytes=len(data) if done else None,
        state=state.value,
        started_at=now,
        ended_at=now if done else None,
        node=node,
    )
    async with server.app[STORE].transaction() as tx:
        await tx.add_recording(row, path=relative)
    return recording_id


async def http(server: SignalingServer, method: str, path: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{server.url}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.read()


async def http_post(server: SignalingServer, path: str, body: Any) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {server.token(VILLAGE)}"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_a_playback_link_plays_on_every_node_and_after_a_restart(start_node: Start) -> None:
    a = await start_node("node-a")
    b = await start_node("node-b")
    _, session_id = await live_session(a)
    data = secrets.token_bytes(2000)
    rec = await add_file(a, session_id, data, RecordingState.COMPLETE, "node-a")
    status, body = await http(a, "POST", f"/api/v1/recordings/{rec}/playback", a.token(VILLAGE))
    assert status == 200, body
    url = json.loads(body)["url"]
    # Made on A, played on B.
    assert await http(b, "GET", url, None) == (200, data)
    # A restarts: its links still play, on it and on B.
    await stop(a)
    a2 = await start_node("node-a")
    assert await http(a2, "GET", url, None) == (200, data)
    assert await http(b, "GET", url, None) == (200, data)


async def open_segment(server: SignalingServer, session_id: str, node: str) -> str:
    """A track segment as a node that died while writing it leaves it: a real WebM file, its
    row still `recording`, naming the node."""
    recording_id = f"rec_{secrets.token_hex(8)}"
    relative = f"recordings/{session_id}/{recording_id}.webm"
    path: Path = server.app[CONFIG].data_dir / relative
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    writer = DiskWriter()
    writer.start()
    try:
        await record_track(
            writer,
            path,
            "audio",
            opus_frames(440.0, 1.0),
            clock=ManualClock(),
            start_s=0.5,
            keys=server.app[RECORDING_KEYS],
        )
    finally:
        await writer.stop()
    row = Recording(
        id=RecordingId(recording_id),
        session_id=SessionId(session_id),
        track="t-audio",
        kind=RecordingKind.TRACK.value,
        media_type="audio/webm",
        sha256=None,
        duration_s=None,
        size_bytes=None,
        state=RecordingState.RECORDING.value,
        started_at=datetime.now(UTC),
        ended_at=None,
        node=node,
    )
    async with server.app[STORE].transaction() as tx:
        await tx.add_recording(row, path=relative)
        await tx.append_event(
            SessionId(session_id),
            datetime.now(UTC),
            EventKind.RECORDING_STARTED,
            VILLAGE.user_id,
            None,
            {},
        )
    return recording_id


async def row_of(server: SignalingServer, recording_id: str) -> Recording:
    async with server.app[STORE].reading() as tx:
        found = await tx.get_recording(RecordingId(recording_id))
    assert found is not None
    return found.recording


async def test_a_dead_workers_segments_are_closed_by_one_live_worker_and_no_one_elses(
    start_node: Start,
) -> None:
    a = await start_node("node-a")
    b = await start_node("node-b")
    dead = a.app[PLACEMENT].worker_id
    cid_a, session_a = await live_session(a)
    cid_b, session_b = await live_session(a)
    its = await open_segment(a, session_a, dead)
    theirs = await open_segment(a, session_b, b.app[PLACEMENT].worker_id)
    # Node A goes (its recorder's rows stay open, as after kill -9) and comes back: a new
    # incarnation of the same node, writing a segment of its own at once.
    await stop(a)
    a2 = await start_node("node-a")
    assert a2.app[PLACEMENT].worker_id != dead
    new = await open_segment(a2, session_a, a2.app[PLACEMENT].worker_id)

    async def closed() -> Recording | None:
        row = await row_of(a2, its)
        return row if row.state != RecordingState.RECORDING.value else None

    recovered = await eventually(closed, "the dead worker's segment is closed", within=60.0)
    assert recovered.state == RecordingState.INTERRUPTED.value, recovered
    path = a2.app[CONFIG].data_dir / f"recordings/{session_a}/{its}.webm"
    # What was recorded into the sealed file (the plaintext's hash and size).
    assert (recovered.sha256, recovered.size_bytes) == sha256_of(a2.app, path, unfinished_ok=True)
    # One of the live workers did it, under the lease, and forgot the dead one.
    cleaners = (b.app[TAKEOVER], a2.app[TAKEOVER])
    await eventually(
        lambda: any(c.cleaned_up for c in cleaners), "the cleanup is done", within=60.0
    )
    assert sorted(c.cleaned_up for c in cleaners) == [[], [dead]]
    assert await b.app[PLACEMENT].dead_workers() == []
    # The sessions go on (a room is taken over at its next join); nothing else was touched.
    assert await a2.status(cid_a) is ConsultationStatus.LIVE
    assert "recording_stopped" not in await a2.event_kinds(cid_a)
    assert (await row_of(a2, theirs)).state == RecordingState.RECORDING.value
    assert (await row_of(a2, new)).state == RecordingState.RECORDING.value
    assert await a2.status(cid_b) is ConsultationStatus.LIVE


async def test_a_stop_or_abort_on_one_node_stops_the_recorder_on_the_other(
    start_node: Start,
) -> None:
    a = await start_node("node-a")
    b = await start_node("node-b")
    cid = (await a.scheduled()).id
    village = await a.seated(VILLAGE, cid, label="village@A")
    specialist = await b.seated(SPECIALIST, cid, label="specialist@B")
    token, _ = await a.invite(cid, Role.RESIDENT)
    resident = await a.admitted(token, cid, village, label="resident@A")
    await resident.ok("consent", {"kind": "recording", "granted": True})
    await village.ok("start_recording")
    # The recorder runs on the room's worker (placement decides which node that is); the
    # stop and the abort come from the other node.
    owner, other = (a, b) if ConsultationId(cid) in a.app[RECORDINGS].recording else (b, a)
    assert ConsultationId(cid) in owner.app[RECORDINGS].recording
    stopper = specialist if other is b else village
    await stopper.ok("stop_recording")
    await eventually(
        lambda: ConsultationId(cid) not in owner.app[RECORDINGS].recording, "the recorder stops"
    )
    await village.ok("start_recording")
    # Aborted over REST on the other node: the recorder stops, every client is told and
    # disconnected.
    status, body = await http_post(other, f"/api/v1/consultations/{cid}/abort", {"reason": "停电"})
    assert status == 200, body
    for peer in (village, resident, specialist):
        ended = await peer.wait_for("session_ended")
        assert (ended["reason"], ended["detail"]) == ("aborted", "停电")
        await eventually(lambda p=peer: not p.connected, f"{peer.label} is disconnected")
    await eventually(
        lambda: ConsultationId(cid) not in owner.app[RECORDINGS].recording, "the recorder stops"
    )
    assert await a.presence(cid) is None
    kinds = [k for k in await a.event_kinds(cid) if k.startswith("recording_")]
    assert kinds == ["recording_started", "recording_stopped"] * 2, kinds
