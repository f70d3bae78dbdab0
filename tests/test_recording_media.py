"""Per-track recording: real VP8 and Opus (encoded here, or sent by a real aiortc publisher
through the hub) written by the writer thread, read back with PyAV: codec, duration, colour,
tone, session-clock offsets, hashes; a writer killed with SIGKILL; a full queue."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from media_peers import (
    LOOPBACK,
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    local_description,
    mean_colour,
    wait_for,
)
from recording_helpers import (
    ManualClock,
    decode,
    opus_frames,
    record_track,
    record_until_killed,
    vp8_frames,
)

from media.frames import EncodedFrame
from media.hub import MediaHub, TrackInfo
from media.peer import PeerConfig
from media.recorder import RoomRecorder
from media.recording import (
    START_TAG,
    DiskWriter,
    SegmentInfo,
    SegmentState,
    SegmentWriter,
    recover_segment,
)
from media.sealed import SealKeys, plaintext_sha256

RED = (200, 40, 40)
GREEN = (40, 200, 40)


@pytest.fixture
async def writer() -> AsyncIterator[DiskWriter]:
    disk = DiskWriter()
    disk.start()
    try:
        yield disk
    finally:
        await disk.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_video_and_audio_segments_keep_their_codec_colour_tone_and_length(
    writer: DiskWriter, tmp_path: Path
) -> None:
    clock = ManualClock()
    video = await record_track(
        writer, tmp_path / "v.webm", "video", vp8_frames(RED, 4.0), clock=clock, start_s=1.25
    )
    audio = await record_track(
        writer, tmp_path / "a.webm", "audio", opus_frames(440.0, 4.0), clock=clock, start_s=1.5
    )

    for info, kind, codec in ((video, "video", "vp8"), (audio, "audio", "opus")):
        assert (info.kind, info.codec, info.state) == (kind, codec, SegmentState.COMPLETE)
        assert info.sha256 == sha256_of(info.path)
        assert info.size_bytes == info.path.stat().st_size
        assert abs(info.duration_s - 4.0) < 0.05
        assert info.dropped == 0
    assert (video.frames, audio.frames) == (120, 200)
    assert (video.start_s, audio.start_s) == (1.25, 1.5)

    decoded_video = decode(video.path)
    assert decoded_video.codec == "vp8"
    assert abs(decoded_video.duration_s - 4.0) < 0.3
    assert len(decoded_video.video) == 120
    assert decoded_video.video[0].key_frame
    assert all(close_to(mean_colour(f), RED) for f in decoded_video.video)
    decoded_audio = decode(audio.path)
    assert decoded_audio.codec == "opus"
    assert abs(decoded_audio.duration_s - 4.0) < 0.3
    assert abs(dominant_frequency(decoded_audio.audio) - 440.0) < 10
    with av.open(str(video.path)) as container:
        assert float(container.metadata[START_TAG]) == 1.25


async def test_video_starts_at_a_keyframe_and_asks_for_one(
    writer: DiskWriter, tmp_path: Path
) -> None:
    frames = vp8_frames(GREEN, 5.0)  # keyframes at 0 s, 2 s, 4 s
    late = frames[10:]  # joined mid-picture: the first 50 frames cannot be decoded
    requests: list[float] = []
    info = await record_track(
        writer,
        tmp_path / "v.webm",
        "video",
        late,
        clock=ManualClock(),
        start_s=0.0,
        keyframe_requests=requests,
    )
    assert len(requests) == 50
    assert (info.frames, info.dropped) == (90, 50)
    decoded = decode(info.path)
    assert decoded.video[0].key_frame
    assert len(decoded.video) == 90
    assert abs(decoded.duration_s - 3.0) < 0.3


async def test_a_gap_in_video_resumes_at_the_next_keyframe(
    writer: DiskWriter, tmp_path: Path
) -> None:
    frames = vp8_frames(RED, 5.0)
    # 1.0-1.9 s never arrive (a forced mute): what follows until 2 s refers to lost frames.
    sent = frames[:30] + frames[57:]
    info = await record_track(
        writer, tmp_path / "v.webm", "video", sent, clock=ManualClock(), start_s=0.0
    )
    assert (info.frames, info.dropped) == (30 + 90, 3)
    decoded = decode(info.path)
    assert [f.key_frame for f in decoded.video].count(True) == 3  # 0 s, 2 s, 4 s
    assert all(close_to(mean_colour(f), RED) for f in decoded.video)


async def test_tracks_started_at_different_times_keep_their_session_offsets(
    writer: DiskWriter, tmp_path: Path
) -> None:
    clock = ManualClock()
    first = SegmentWriter(writer, tmp_path / "1.webm", "audio", session_clock=clock)
    second = SegmentWriter(writer, tmp_path / "2.webm", "audio", session_clock=clock)
    tones = {440.0: opus_frames(440.0, 3.0), 880.0: opus_frames(880.0, 3.0)}
    # The second track begins 2.5 s after the first (by arrival), with its own RTP origin.
    for n, frame in enumerate(tones[440.0]):
        clock.now = n / 50
        first.push(frame)
        if clock.now >= 2.5:
            shifted = tones[880.0][n - 125]
            second.push(EncodedFrame(shifted.data, shifted.timestamp + 99_999, True))
    infos = [await first.close(), await second.close()]
    assert infos[0] is not None and infos[1] is not None
    assert (infos[0].start_s, infos[1].start_s) == (0.0, 2.5)
    for info in infos:
        recovered = recover_segment(info.path)
        assert recovered.start_s == info.start_s
        assert recovered.sha256 == info.sha256
    assert abs(infos[1].duration_s - 0.5) < 0.05


async def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    disk = DiskWriter(max_pending=8)
    disk.start()
    requests: list[int] = []
    segment = SegmentWriter(
        disk,
        tmp_path / "v.webm",
        "video",
        session_clock=ManualClock(),
        request_keyframe=lambda: requests.append(1),
    )
    frames = vp8_frames(RED, 3.0)
    # While the event loop holds the interpreter the writer thread cannot take anything off the
    # queue: every push after the eighth finds it full.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        for frame in frames:
            segment.push(frame)
    finally:
        sys.setswitchinterval(interval)
    assert (segment.frames, segment.dropped) == (8, 82)
    assert len(requests) == 82  # after a lost frame, video needs a keyframe again
    info = await segment.close()
    await disk.stop()
    assert info is not None
    assert (info.frames, info.dropped) == (8, 82)
    decoded = decode(info.path)
    assert len(decoded.video) == 8
    assert all(close_to(mean_colour(f), RED) for f in decoded.video)


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_killed_writer_leaves_segments_that_recover(tmp_path: Path, sealed: bool) -> None:
    key = os.urandom(32) if sealed else None
    keys = SealKeys(key) if key is not None else None
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    child = context.Process(target=record_until_killed, args=(str(tmp_path), started, key))
    child.start()
    try:
        assert started.wait(60), "the recording child never started"
        time.sleep(8.0)  # recording in real time
        if keys is not None:
            # A sealed file shows what it holds a sealed chunk at a time: on a loaded machine
            # 8 s of real time may not have sealed a few KiB of each yet.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                (tmp_path / f"{kind}.webm").stat().st_size > 4096 for kind in ("video", "audio")
            ):
                time.sleep(0.2)  # poll interval, bounded by the deadline
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    for kind, codec in (("video", "vp8"), ("audio", "opus")):
        path = tmp_path / f"{kind}.webm"
        info = recover_segment(path, keys)
        assert info.state is SegmentState.INTERRUPTED
        assert (info.kind, info.codec) == (kind, codec)
        if keys is None:
            assert (info.sha256, info.size_bytes) == (sha256_of(path), path.stat().st_size)
        else:
            # Of the plaintext; a kill inside a write loses at most the open last chunk.
            assert b"\x1a\x45\xdf\xa3" not in path.read_bytes()
            assert (info.sha256, info.size_bytes) == plaintext_sha256(
                path, keys, unfinished_ok=True
            )
        assert (7.0 if keys is None else 5.5) <= info.duration_s <= 8.5
        assert 0.0 <= info.start_s < 0.5
        decoded = decode(path, keys)  # decodes without error to the end
        assert decoded.duration_s >= (7.0 if keys is None else 5.5)
        if kind == "video":
            assert all(close_to(mean_colour(f), GREEN) for f in decoded.video)
        else:
            assert abs(dominant_frequency(decoded.audio) - 660.0) < 10


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_an_empty_file_left_by_a_crash_is_recovered_as_nothing(
    tmp_path: Path, sealed: bool
) -> None:
    path = tmp_path / "empty.webm"
    path.write_bytes(b"")
    info = recover_segment(path, SealKeys(os.urandom(32)) if sealed else None)
    assert info.state is SegmentState.INTERRUPTED
    assert (info.duration_s, info.size_bytes) == (0.0, 0)
    assert info.sha256 == hashlib.sha256(b"").hexdigest()
    assert info.error is not None


# --- a real publisher through the hub --------------------------------------------------------


class Publisher:
    """One aiortc publisher of a colour and a tone, published through the hub."""

    def __init__(self, hub: MediaHub, room: str, who: str) -> None:
        self.hub, self.room, self.who = hub, room, who
        self.pc = RTCPeerConnection()

    async def publish(self, colour: tuple[int, int, int], tone: float) -> list[TrackInfo]:
        await self.hub.enter(self.room, self.who, may_subscribe=False)
        self.pc.addTrack(ColourCounterTrack(colour))
        self.pc.addTrack(ToneTrack(tone))
        offer = await local_description(self.pc, offer=True)
        sources = {
            t.mid: "camera" if t.kind == "video" else "microphone"
            for t in self.pc.getTransceivers()
            if t.mid is not None
        }
        answer, tracks = await self.hub.publish(self.room, self.who, offer, sources)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        return tracks

    async def leave(self) -> None:
        await self.hub.leave(self.room, self.who)
        await self.pc.close()


async def no_offer(room: str, participant: str, sdp: str, tracks: object) -> None:
    raise AssertionError("nobody subscribes in this test")


async def no_layer(*_: object) -> None:
    return None


async def test_a_room_recorded_through_the_hub_gets_a_new_segment_per_publication(
    tmp_path: Path,
) -> None:
    hub = MediaHub(PeerConfig(host_addresses=LOOPBACK), no_offer, no_layer)
    opened: list[SegmentInfo] = []
    closed: list[SegmentInfo] = []

    async def on_opened(info: SegmentInfo) -> None:
        opened.append(info)

    async def on_closed(info: SegmentInfo) -> None:
        closed.append(info)

    recorder = RoomRecorder(
        tmp_path / "rec", "rec_1", on_segment_opened=on_opened, on_segment_closed=on_closed
    )
    await recorder.start()
    publisher = Publisher(hub, "room", "alice")
    try:
        recorder.follow(hub, "room", label_for=lambda info: f"Alice · {info.source}")
        first = await publisher.publish(RED, 440.0)
        await wait_for(lambda: len(opened) == 2, "both first segments opened", 20)
        await asyncio.sleep(3.0)  # record for a while
        left_at = recorder.session_time()
        await publisher.leave()
        await wait_for(lambda: len(closed) == 2, "the first segments closed", 20)

        # Reconnected: published again, with another picture and tone.
        publisher = Publisher(hub, "room", "alice")
        republished_at = recorder.session_time()
        second = await publisher.publish(GREEN, 660.0)
        await wait_for(lambda: len(opened) == 4, "both second segments opened", 20)
        await asyncio.sleep(3.0)
        ended_at = recorder.session_time()
        segments = await recorder.stop()
    finally:
        await publisher.leave()
        await recorder.stop()
        await hub.stop()

    assert len(segments) == 4 and len(closed) == 4
    assert {s.track_id for s in segments} == {t.track_id for t in first + second}
    assert len({s.sha256 for s in segments}) == 4
    assert len({s.path for s in segments}) == 4
    by_track = {s.track_id: s for s in segments}
    for tracks, colour, tone, until in (
        (first, RED, 440.0, left_at),
        (second, GREEN, 660.0, ended_at),
    ):
        for track in tracks:
            info = by_track[track.track_id]
            assert info.path.name.startswith(f"rec_1_{track.track_id}_")
            assert info.path.parent == tmp_path / "rec"
            assert info.label == f"Alice · {track.source}"
            assert info.state is SegmentState.COMPLETE
            assert info.sha256 == sha256_of(info.path)
            # Placed by arrival on the session clock, lasting until the track went.
            assert abs(info.end_s - until) < 0.4
            decoded = decode(info.path)
            assert abs(decoded.duration_s - info.duration_s) < 0.3
            if track.kind == "video":
                assert decoded.codec == "vp8"
                assert decoded.video[0].key_frame
                assert close_to(mean_colour(decoded.video[-1]), colour)
            else:
                assert decoded.codec == "opus"
                assert abs(dominant_frequency(decoded.audio) - tone) < 10
    second_starts = [by_track[t.track_id].start_s for t in second]
    assert all(republished_at < start < republished_at + 2.0 for start in second_starts)
    assert all(by_track[t.track_id].end_s <= min(second_starts) for t in first)
    # The opened callbacks carried the same placement as the closed ones.
    assert {(o.track_id, o.start_s) for o in opened} == {(s.track_id, s.start_s) for s in segments}


@pytest.mark.parametrize("recording_id", ["", "../x", "a/b", "名字", "x" * 65, "a b"])
def test_file_names_only_come_from_safe_ids(tmp_path: Path, recording_id: str) -> None:
    with pytest.raises(ValueError):
        RoomRecorder(tmp_path, recording_id)
