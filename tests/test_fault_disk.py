"""The disk full while recording: the recordings' directory is a small tmpfs of the test's own
(mount needs root, as `make test` runs). The recording stops cleanly through the room, the log
and everyone are told `disk_full`, the segments keep what they hold (hashed as they are), and
the room goes on: chat, media, the end of the session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_client import MediaRoom
from recording_server_helpers import recordings_of, sha256_of
from signaling_fixtures import VILLAGE, eventually
from test_recording_server import publish_looks

from rooms.model import EventKind, RecordingState
from rooms.roles import Role
from server.app import COMPOSITES, RECORDINGS

pytest_plugins = ["signaling_fixtures", "media_client"]

WAIT = 60.0
# Room for the segments' headers and a second or two of two parties' media.
DISK_BYTES = 192 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (make test runs as root)")
    recordings = tmp_path / "data" / "recordings"
    recordings.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(recordings)],
        check=True,
    )
    try:
        yield tmp_path / "data"
    finally:
        subprocess.run(["umount", "-l", str(recordings)], check=True)


async def test_a_full_disk_stops_the_recording_cleanly_and_the_room_goes_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    room = await MediaRoom.start(small_disk)
    try:
        server = room.server
        cid = (await server.scheduled()).id
        village = await room.seated(VILLAGE, cid, label="village")
        token, _ = await server.invite(cid, Role.RESIDENT)
        resident = await room.admitted(token, cid, village.peer, label="resident")
        pids = await publish_looks({"village": village, "resident": resident})
        await resident.peer.ok("consent", {"kind": "recording", "granted": True})
        await village.peer.ok("start_recording")

        # The disk fills; the room is told why the recording stopped, by nobody.
        for peer in (village.peer, resident.peer):
            stopped = await peer.wait_for("recording_stopped", within=WAIT)
            assert stopped["reason"] == "disk_full", stopped
            assert stopped["by"] is None
        presence = await server.presence(cid)
        assert presence is not None and presence.recording is None

        # The segments: closed, marked failed, hashed as they are on the disk.
        await server.app[RECORDINGS].wait()
        rows = [(r, p) for r, p in await recordings_of(server.app, cid) if r.kind == "track"]
        assert rows, "segments were opened before the disk filled"
        for row, path in rows:
            assert row.state in (RecordingState.FAILED.value, RecordingState.COMPLETE.value), row
            assert row.ended_at is not None, row
            if path is not None and path.exists() and row.sha256 is not None:
                # What the sealed file holds, as far as its seal reaches (the disk cut it).
                digest, size = sha256_of(server.app, path, unfinished_ok=True)
                assert (row.sha256, row.size_bytes) == (digest, size), row
        assert any(r.state == RecordingState.FAILED.value for r, _ in rows), rows

        # The room goes on: chat is recorded and delivered, media still flows.
        await village.peer.ok("chat", {"text": "录像停了，会诊继续"})
        await resident.peer.wait_for("chat_message", lambda m: m["text"].startswith("录像"))
        video = resident.offered_from(pids["village"], "video")[0]
        seen = resident.frames_of(video)
        await eventually(lambda: resident.frames_of(video) >= seen + 30, "video after the stop")
        await village.peer.ok("end_session")
        await server.app[COMPOSITES].wait()

        record = await server.record(cid)
        assert record.sessions[0].end_reason == "ended"
        stops = [e.data for e in record.events if e.kind == EventKind.RECORDING_STOPPED]
        assert stops == [{"reason": "disk_full"}], stops
        starts = [e for e in record.events if e.kind == EventKind.RECORDING_STARTED]
        assert len(starts) == 1
        chats = [e.data["text"] for e in record.events if e.kind == EventKind.CHAT]
        assert chats == ["录像停了，会诊继续"]
        # Said in the log as what it is, without a traceback.
        ours = [r for r in caplog.records if r.name.startswith(("media", "server", "signaling"))]
        assert not [r.getMessage() for r in ours if r.exc_info]
        assert any("the disk is full" in r.getMessage() for r in ours)
    finally:
        await room.close()
