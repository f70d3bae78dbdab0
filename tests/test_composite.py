"""The composite: four recorded tracks of known colours and tones, rendered in a worker
process into one MP4, read back: each tile's colour where the grid puts it, black before a
track starts, labels drawn, every tone in the mix, a flash and a beep in sync, annotations
burnt in for a while, progress to 1.0, and a rerun that replaces the file whole."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from recording_helpers import (
    Colour,
    ManualClock,
    centre_colour,
    has_tone,
    onset,
    opus_frames,
    record_track,
    tone_energy,
    vp8_frames,
)

from media.composite import (
    CompositeError,
    CompositeJob,
    Stroke,
    job_from_segments,
    render_composite,
    run_composite,
)
from media.recording import DiskWriter, SegmentInfo
from media.sealed import SealKeys, media_input, plaintext_sha256

# (colour, tone Hz, start on the session clock, label)
TRACKS: list[tuple[Colour, float, float, str]] = [
    ((200, 40, 40), 300.0, 0.0, "张医生 · 会诊医生"),
    ((40, 200, 40), 500.0, 0.4, "Dr Wang · resident"),
    ((40, 40, 200), 700.0, 1.5, "李护士 · nurse"),
    ((200, 200, 40), 1100.0, 0.8, "Guest · family"),
]
SECONDS = 6.0
FLASH_AT = 3.0  # seconds into the first track: a white flash and a 3 kHz beep
BEEP_HZ = 3000.0
W, H, FPS = 640, 480, 15
GRID = [(0, 0, 320, 240), (320, 0, 320, 240), (0, 240, 320, 240), (320, 240, 320, 240)]
# Tiles are laid out in the order participants first appear on the session clock.
QUADRANTS = [GRID[sorted(t[2] for t in TRACKS).index(track[2])] for track in TRACKS]


@pytest.fixture
async def segments(tmp_path: Path) -> AsyncIterator[list[SegmentInfo]]:
    writer = DiskWriter()
    writer.start()
    clock = ManualClock()
    infos: list[SegmentInfo] = []
    try:
        for n, (colour, tone, start, label) in enumerate(TRACKS):
            flash = (FLASH_AT, FLASH_AT + 0.3) if n == 0 else None
            beep = (FLASH_AT, FLASH_AT + 0.3, BEEP_HZ) if n == 0 else None
            for kind, frames in (
                ("video", vp8_frames(colour, SECONDS, flash=flash)),
                ("audio", opus_frames(tone, SECONDS, beep=beep)),
            ):
                info = await record_track(
                    writer, tmp_path / f"{n}-{kind}.webm", kind, frames, clock=clock, start_s=start
                )
                infos.append(
                    replace(
                        info,
                        track_id=f"t{n}{kind[0]}",
                        participant=f"p{n}",
                        source="camera" if kind == "video" else "microphone",
                        label=label,
                    )
                )
        yield infos
    finally:
        await writer.stop()


def video_frames(path: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [
            (float(f.time or 0.0), f.to_ndarray(format="rgb24"))
            for f in container.decode(container.streams.video[0])
        ]


def mixed_audio(path: Path) -> tuple[np.ndarray, float]:
    """Mono samples of the MP4's audio and the session time of the first one."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=48_000)
        chunks, first = [], None
        for frame in container.decode(container.streams.audio[0]):
            if first is None:
                first = float(frame.time or 0.0)
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        return np.concatenate(chunks), first or 0.0


def hidden_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def at(frames: list[tuple[float, np.ndarray]], t: float) -> np.ndarray:
    return min(frames, key=lambda item: abs(item[0] - t))[1]


async def test_four_tracks_become_one_labelled_grid_with_mixed_audio_in_sync(
    segments: list[SegmentInfo], tmp_path: Path
) -> None:
    output = tmp_path / "out" / "composite.mp4"
    job = job_from_segments(segments, output, width=W, height=H, fps=FPS)
    progress: list[float] = []
    result = await run_composite(job, progress.append)

    assert progress[-1] == 1.0
    assert progress == sorted(progress) and len(progress) > 10
    assert result.output == str(output)
    assert abs(result.duration_s - (1.5 + SECONDS)) < 0.1
    data = output.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: playable while downloading
    with av.open(str(output)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert (container.streams.video[0].width, container.streams.video[0].height) == (W, H)

    frames = video_frames(output)
    assert abs(len(frames) - result.frames) <= 1
    late = at(frames, 5.0)
    for (colour, _, start, _), box in zip(TRACKS, QUADRANTS, strict=True):
        got = centre_colour(late, box)
        assert all(abs(a - b) < 40 for a, b in zip(got, colour, strict=True)), (colour, got)
        # The label (bottom left of the tile) is not the plain colour.
        x, y, _, h = box
        label = late[y + h - 20 : y + h - 4, x + 4 : x + 80].astype(int)
        assert np.abs(label - np.array(colour)).max() > 120
        # Before its track starts, and after it ends, a tile is dark.
        if start > 0.3:
            assert max(centre_colour(at(frames, start - 0.3), box)) < 40
        if start + SECONDS + 0.3 < result.duration_s:
            assert max(centre_colour(at(frames, start + SECONDS + 0.3), box)) < 40

    samples, audio_start = mixed_audio(output)
    middle = samples[int((2.0 - audio_start) * 48_000) : int((2.9 - audio_start) * 48_000)]
    for _, tone, _, _ in TRACKS:
        assert has_tone(middle, 48_000, tone), tone

    # The flash and the beep happened together in track 0; so they must in the composite.
    flash_frame = onset([float(np.mean(centre_colour(f, QUADRANTS[0]))) for _, f in frames], 230)
    video_onset = frames[flash_frame][0]
    window = 240  # 5 ms
    energy = tone_energy(samples, 48_000, BEEP_HZ, window)
    audio_onset = audio_start + onset(energy, max(energy) / 2) * window / 48_000
    assert abs(video_onset - FLASH_AT) < 0.1
    assert abs(audio_onset - FLASH_AT) < 0.05
    assert abs(video_onset - audio_onset) <= 0.1


async def test_a_rerun_replaces_the_output_whole_and_a_failure_keeps_it(
    segments: list[SegmentInfo], tmp_path: Path
) -> None:
    output = tmp_path / "composite.mp4"
    job = job_from_segments(segments[:2], output, width=320, height=240, fps=15)
    first = render_composite(job)
    inode = output.stat().st_ino
    again = await run_composite(job)
    assert output.stat().st_ino != inode  # a new file renamed over the old one
    assert again.sha256 != "" and again.size_bytes == output.stat().st_size
    assert abs(again.duration_s - first.duration_s) < 1e-6
    assert len(video_frames(output)) == again.frames

    broken = replace(
        job,
        tiles=(
            replace(
                job.tiles[0],
                segments=(replace(job.tiles[0].segments[0], path=str(tmp_path / "gone.webm")),),
            ),
        ),
    )
    with pytest.raises(CompositeError):
        await run_composite(broken)
    assert output.stat().st_ino != inode and len(video_frames(output)) == again.frames
    assert hidden_files(tmp_path) == []  # no temporary files left


async def test_annotations_are_drawn_on_their_tile_for_a_while(
    segments: list[SegmentInfo], tmp_path: Path
) -> None:
    output = tmp_path / "teaching.mp4"
    green_video = next(s for s in segments if s.track_id == "t1v")
    stroke = Stroke("t1v", 2.0, ((0.1, 0.5), (0.9, 0.5)), colour="#ff00ff", width=8)
    job = job_from_segments(
        [green_video], output, strokes=[stroke], width=320, height=240, fps=15, stroke_s=2.0
    )
    assert isinstance(job, CompositeJob)
    render_composite(job)
    frames = video_frames(output)
    magenta = np.array([255, 0, 255])

    def on_line(t: float) -> bool:
        row = at(frames, t)[120, 60:260].astype(int)
        return bool(np.abs(row - magenta).max() < 60)

    assert not on_line(1.5)
    assert on_line(2.5) and on_line(3.8)
    assert not on_line(4.5)
    # The rest of the tile keeps its colour.
    assert all(
        abs(a - b) < 40
        for a, b in zip(at(frames, 3.0)[40, 160].tolist(), (40, 200, 40), strict=True)
    )


async def test_sealed_segments_make_a_sealed_composite(tmp_path: Path) -> None:
    keys = SealKeys(os.urandom(32))
    writer = DiskWriter()
    writer.start()
    try:
        colour, tone = TRACKS[0][0], TRACKS[0][1]
        infos = [
            replace(
                await record_track(writer, tmp_path / f"{kind}.webm", kind, frames, keys=keys),
                track_id=f"t{kind[0]}",
                participant="p0",
            )
            for kind, frames in (
                ("video", vp8_frames(colour, 3.0)),
                ("audio", opus_frames(tone, 3.0)),
            )
        ]
    finally:
        await writer.stop()
    output = tmp_path / "composite.mp4"
    job = job_from_segments(infos, output, width=320, height=240, fps=15)

    result = await run_composite(job, keys=keys)  # the keys go over the child's stdin

    on_disk = output.read_bytes()
    assert b"ftyp" not in on_disk and b"mdat" not in on_disk  # nothing of the MP4 readable
    assert (result.sha256, result.size_bytes) == plaintext_sha256(output, keys)
    with media_input(output, keys) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        frames = [
            (float(f.time or 0.0), f.to_ndarray(format="rgb24"))
            for f in container.decode(container.streams.video[0])
        ]
    got = centre_colour(at(frames, 1.5), (0, 0, 320, 240))
    assert all(abs(a - b) < 40 for a, b in zip(got, colour, strict=True)), got
    with media_input(output, keys) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=48_000)
        samples = np.concatenate(
            [
                out.to_ndarray().reshape(-1)
                for frame in container.decode(container.streams.audio[0])
                for out in resampler.resample(frame)
            ]
        )
    assert has_tone(samples, 48_000, tone)
    assert hidden_files(tmp_path) == []  # no temporary (or job) files left

    # A segment that does not read back as the record says it was recorded is not used.
    altered = replace(
        job, audio=(replace(job.audio[0], sha256=hashlib.sha256(b"other").hexdigest()),)
    )
    with pytest.raises(CompositeError, match="segment ta does not match the SHA-256"):
        await run_composite(altered, keys=keys)
