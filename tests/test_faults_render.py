"""The composite render under faults: its child process killed (a crash of the renderer), and
the whole server killed with -9 while it renders. The record afterwards: the track segments
untouched, the composite `failed` (nothing half-written left on disk) or made again on restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from media_client import MediaClient, MediaRoom
from recording_server_helpers import read_composite, recordings_of, sha256_of
from signaling_fixtures import VILLAGE, eventually
from test_faults_kill import connected, deployment, scheduled_consultation, served
from test_recording_server import publish_looks, rest

from rooms.model import ConsultationId, RecordingState, SessionId
from rooms.roles import Role
from server.app import COMPOSITES

pytest_plugins = ["signaling_fixtures", "media_client"]

WAIT = 60.0
RECORD_S = 4.0


def render_children() -> list[int]:
    """Pids of this machine's `python -m media.composite` processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"media.composite" in argv:
                found.append(int(entry.name))
    return found


def partial_files(data_dir: Path) -> list[Path]:
    return list(data_dir.rglob(".composite.mp4.*.tmp"))


async def test_a_composite_render_that_crashes_fails_cleanly_and_can_be_made_again(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await media_room.admitted(token, cid, village.peer, label="resident")
    await publish_looks({"village": village, "resident": resident})
    await resident.peer.ok("consent", {"kind": "recording", "granted": True})
    await village.peer.ok("start_recording")
    await asyncio.sleep(RECORD_S)
    await village.peer.ok("end_session")

    async def child() -> list[int]:
        return render_children()

    pids = await eventually(child, "the render's child process", within=WAIT)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await server.app[COMPOSITES].wait()

    rows = await recordings_of(server.app, cid)
    (composite,) = [r for r, _ in rows if r.kind == "composite"]
    assert composite.state == RecordingState.FAILED.value, composite
    assert composite.sha256 is None and composite.ended_at is not None
    # The segments are as they were: complete, hashed.
    tracks = [(r, p) for r, p in rows if r.kind == "track"]
    assert len(tracks) == 4
    for row, path in tracks:
        assert row.state == RecordingState.COMPLETE.value, row
        assert path is not None and (row.sha256, row.size_bytes) == sha256_of(server.app, path)
    assert partial_files(server.config.data_dir) == []
    record = await server.record(cid)
    assert record.sessions[0].end_reason == "ended"

    # Made again on request, from the same segments.
    session_id = SessionId(record.sessions[0].id)
    again = await server.app[COMPOSITES].render(ConsultationId(cid), session_id)
    assert again is not None and again.state == RecordingState.COMPLETE.value, again
    assert again.id == composite.id  # the one composite row of the session, updated
    (_, path), *_ = [(r, p) for r, p in await recordings_of(server.app, cid) if r.id == again.id]
    assert path is not None and again.sha256 == sha256_of(server.app, path)[0]
    assert read_composite(server.app, path).video_frames > 0


async def test_kill_9_while_rendering_renders_again_on_restart(tmp_path: Path) -> None:
    d = deployment(tmp_path)
    async with served(d) as (process, peers):
        url = process.url
        cid, resident_token = await scheduled_consultation(d, url)
        village_peer = await connected(url, peers, "village", d.token(VILLAGE))
        await village_peer.join(cid)
        await village_peer.wait_for("joined", within=WAIT)
        resident_peer = await connected(url, peers, "resident", resident_token)
        await resident_peer.join(cid)
        waiting = await resident_peer.wait_for("waiting", within=WAIT)
        await village_peer.ok("admit", {"participant": waiting["participant"]["participant_id"]})
        await resident_peer.wait_for("joined", within=WAIT)
        clients = {"village": MediaClient(village_peer), "resident": MediaClient(resident_peer)}
        try:
            await publish_looks(clients)
            await resident_peer.ok("consent", {"kind": "recording", "granted": True})
            await village_peer.ok("start_recording")
            await asyncio.sleep(RECORD_S)
            await village_peer.ok("end_session")

            async def rendering() -> bool:
                record = await rest(
                    url, "GET", f"/api/v1/consultations/{cid}/record", d.token(VILLAGE)
                )
                return any(
                    r["kind"] == "composite" and r["state"] == "rendering"
                    for r in record["recordings"]
                )

            await eventually(rendering, "the composite under way", within=WAIT)
            process.kill()
        finally:
            for client in clients.values():
                with contextlib.suppress(Exception):
                    await client.close()

    # The orphaned renderer stops at its next progress line (its parent's pipe is gone).
    await eventually(lambda: not render_children(), "the old renderer gone", within=WAIT)
    server = await d.restart()
    try:
        await server.app[COMPOSITES].wait()
        rows = await recordings_of(server.app, cid)
        composites = [(r, p) for r, p in rows if r.kind == "composite"]
        assert len(composites) == 1, composites
        ((composite, path),) = composites
        assert composite.state == RecordingState.COMPLETE.value, composite
        assert path is not None and composite.sha256 == sha256_of(server.app, path)[0]
        content = read_composite(server.app, path)
        assert content.video_frames > 0
        assert partial_files(d.data_dir) == []
        tracks = [r for r, _ in rows if r.kind == "track"]
        assert len(tracks) == 4 and all(r.state == RecordingState.COMPLETE.value for r in tracks)
        record = await server.record(cid)
        assert record.sessions[0].end_reason == "ended"
    finally:
        await server.close()
