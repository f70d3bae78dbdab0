"""`telemed render`: (re)makes a session's composite from the segments in the record, with a
progress bar, as an operator runs it (the console script in a subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from recording_helpers import ManualClock, has_tone, opus_frames, record_track, vp8_frames
from test_store import add_with_session

from media.recording import DiskWriter
from media.sealed import SealedReader, SealKeys, media_input
from rooms.model import (
    ConsultationId,
    Recording,
    RecordingId,
    RecordingKind,
    RecordingState,
    SessionId,
)
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore

TELEMED = Path(sys.executable).parent / "telemed"
RED = (220, 30, 30)


def _key_file(data_dir: Path) -> Path:
    return data_dir.parent / "recording.key"


def _telemed(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env["TELEMED_DATA_DIR"] = str(data_dir)
    env["TELEMED_RECORDING_KEY_FILE"] = str(_key_file(data_dir))
    return subprocess.run(
        [str(TELEMED), *args],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        check=False,
    )


async def _recorded_session(data_dir: Path) -> tuple[SqlRecordStore, SealKeys]:
    """A consultation c1 whose session s1 recorded 3 s of red video and a 440 Hz tone, sealed
    with the key in `_key_file`."""
    url = f"sqlite+aiosqlite:///{data_dir / 'telemed.db'}"
    await asyncio.to_thread(data_dir.mkdir, parents=True)
    key = os.urandom(32)
    await asyncio.to_thread(_key_file(data_dir).write_bytes, key)
    keys = SealKeys(key)
    await upgrade(url)
    store = SqlRecordStore(url)
    await store.start()
    await add_with_session(store)
    folder = data_dir / "recordings" / "s1"
    await asyncio.to_thread(folder.mkdir, parents=True)
    disk = DiskWriter()
    disk.start()
    try:
        clock = ManualClock()
        video = await record_track(
            disk, folder / "v.webm", "video", vp8_frames(RED, 3.0), clock=clock, keys=keys
        )
        audio = await record_track(
            disk, folder / "a.webm", "audio", opus_frames(440.0, 3.0), clock=clock, keys=keys
        )
    finally:
        await disk.stop()
    now = datetime.now(UTC)
    row = Recording(
        id=RecordingId("rec_video"),
        session_id=SessionId("s1"),
        track="t_video",
        kind=RecordingKind.TRACK.value,
        media_type="video/webm",
        sha256=video.sha256,
        duration_s=video.duration_s,
        size_bytes=video.size_bytes,
        state=RecordingState.COMPLETE.value,
        started_at=now,
        ended_at=now,
        participant_id="p_1",
        name="李医生",
        role="village_doctor",
        source="camera",
        offset_s=0.0,
    )
    async with store.transaction() as tx:
        await tx.add_recording(row, path="recordings/s1/v.webm")
        await tx.add_recording(
            replace(
                row,
                id=RecordingId("rec_audio"),
                track="t_audio",
                media_type="audio/webm",
                sha256=audio.sha256,
                duration_s=audio.duration_s,
                size_bytes=audio.size_bytes,
                source="microphone",
            ),
            path="recordings/s1/a.webm",
        )
    return store, keys


async def test_render_makes_the_composite_and_reports_progress(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store, keys = await _recorded_session(data_dir)
    try:
        done = await asyncio.to_thread(_telemed, ["render", "c1"], data_dir)
        assert done.returncode == 0, done.stderr
        assert "100%" in done.stderr  # the progress bar reached its end
        async with store.reading() as tx:
            composites = [
                r
                for r in await tx.list_recordings(ConsultationId("c1"))
                if r.kind == RecordingKind.COMPOSITE.value
            ]
            assert len(composites) == 1
            composite = composites[0]
            found = await tx.get_recording(composite.id)
        assert found is not None and found.path is not None
        assert composite.id in done.stdout
        assert composite.state == "complete" and composite.media_type == "video/mp4"
        assert composite.progress == 1.0
        file = data_dir / found.path
        with SealedReader(file, keys) as reader:
            content = reader.read_span(0, reader.size)
        assert composite.sha256 == hashlib.sha256(content).hexdigest()
        assert composite.size_bytes == len(content)
        assert composite.duration_s is not None and abs(composite.duration_s - 3.0) < 0.5
        with media_input(file, keys) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with media_input(file, keys) as container:
            samples = np.concatenate(
                [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
            )
        # The one tile is red somewhere in the middle of the picture; the tone is there.
        middle = frames[len(frames) // 2]
        h, w, _ = middle.shape
        centre = middle[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].reshape(-1, 3).mean(axis=0)
        assert centre[0] > 150 and centre[1] < 90 and centre[2] < 90, centre
        assert has_tone(samples, 48_000, 440.0)

        # A rerun replaces the file and keeps the one composite row.
        again = await asyncio.to_thread(_telemed, ["render", "c1", "--session", "s1"], data_dir)
        assert again.returncode == 0, again.stderr
        async with store.reading() as tx:
            kinds = [r.kind for r in await tx.list_recordings(ConsultationId("c1"))]
        assert kinds.count(RecordingKind.COMPOSITE.value) == 1
    finally:
        await store.stop()


async def test_render_of_an_unknown_session_is_a_usage_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store, _ = await _recorded_session(data_dir)
    await store.stop()
    done = await asyncio.to_thread(_telemed, ["render", "c1", "--session", "nope"], data_dir)
    assert done.returncode == 2
    assert "no session nope in c1" in done.stderr
