"""Per-track recording without re-encoding: the forwarded VP8 or Opus frames of one track go
into a WebM (Matroska) file, one file per *segment* (a track from its first frame until it is
removed or ends). Muxing, disk writes and hashing run in one writer thread fed by a bounded
queue; the event loop only checks and enqueues, and when the queue is full it drops and counts.

Crash safety (facts in docs/media.md): Matroska with short clusters and every packet flushed
keeps all but the open cluster (here at most half a second) after a `kill -9`;
`recover_segment` reads such a file back without rewriting it.

Given `SealKeys`, files are sealed as they are written (media/sealed.py): the muxer writes into
a `SealedWriter`, never a plaintext file, and `sha256`/`size_bytes` describe the plaintext.

Timestamps: each segment's first frame is placed on the recording's *session clock* (seconds
since the recording started) at its arrival time; later frames follow by their RTP timestamp
deltas. Inside the file, timestamps start at 0; the offset is in `SegmentInfo.start_s` and in
the file's `TELEMED_SESSION_START_S` tag (written with the header, so it survives a crash)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fractions
import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import av

from media.frames import EncodedFrame
from media.sealed import SealedWriter, SealKeys, media_input, plaintext_sha256

log = logging.getLogger(__name__)

CLOCK_RATE = {"video": 90_000, "audio": 48_000}
CODEC = {"video": "vp8", "audio": "opus"}
MUXER_OPTIONS = {
    # The muxer holds a cluster in memory until it closes it: a kill loses the open one, so
    # clusters close every half second ...
    "cluster_time_limit": "500",
    # ... and every packet goes to the file at once instead of sitting in an I/O buffer.
    "flush_packets": "1",
    # A silent track must not make the muxer hold packets back (microseconds).
    "max_interleave_delta": "100000",
}
START_TAG = "TELEMED_SESSION_START_S"
# Frames waiting for the writer thread, across all segments of one writer: a few seconds of a
# four-party room. Beyond this the event loop drops instead of waiting.
DEFAULT_MAX_PENDING = 2000
# A video gap longer than this (RTP time) means frames went missing (a forced mute, a drop):
# the segment resumes at the next keyframe rather than record a broken picture.
VIDEO_GAP_S = 0.5


class WriteFailure(StrEnum):
    """Why a segment's writer gave up: said to the room and written to the record."""

    DISK_FULL = "disk_full"
    WRITE_FAILED = "write_failed"


def failure_of(exc: BaseException) -> WriteFailure:
    """A full disk wherever it shows: our sealed file's write, or PyAV's error for it."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return WriteFailure.DISK_FULL
        cause = cause.__cause__ or cause.__context__
    return WriteFailure.WRITE_FAILED


class SegmentState(StrEnum):
    RECORDING = "recording"
    COMPLETE = "complete"
    # Left open by a process that died; recovered by `recover_segment`.
    INTERRUPTED = "interrupted"
    # The writer failed (disk full, ...): what the file holds is described, nothing more.
    FAILED = "failed"


@dataclass(frozen=True)
class SegmentInfo:
    """What the record keeps about one segment file.

    `start_s` is where the segment's first frame sits on the session clock; `duration_s` is
    measured from the frames written (or, when recovered, demuxed). `sha256` and `size_bytes`
    describe what was recorded, as closed (None / 0 while recording): the WebM itself, also
    when the file on disk is sealed. `frames` counts frames written,
    `dropped` frames the segment lost (full queue, waiting for a keyframe, out of order)."""

    path: Path
    kind: str
    codec: str
    start_s: float
    state: SegmentState
    duration_s: float = 0.0
    size_bytes: int = 0
    sha256: str | None = None
    frames: int = 0
    dropped: int = 0
    track_id: str = ""
    participant: str = ""
    source: str = ""
    label: str = ""
    error: str | None = None

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


class DiskWriter:
    """The thread that does every segment's muxing, writing and hashing, in order.

    Jobs are plain callables. `try_submit` (frames) is bounded: it returns False instead of
    waiting when `max_pending` frames are already queued. `submit` (opening and closing
    segments) is never refused, so a close always happens. Life cycle: `start()`, then
    `await stop()`, which runs everything queued before it and joins the thread."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING, name: str = "recording") -> None:
        self.max_pending = max_pending
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # Counts queued frames; released by the thread as each one is done.
        self._slots = threading.BoundedSemaphore(max_pending)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the disk writer is not started")
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the disk writer is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def try_submit(self, job: Callable[[], None]) -> bool:
        if self._thread is None or not self._slots.acquire(blocking=False):
            return False
        self._jobs.put(self._counted(job))
        return True

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            raise RuntimeError("the disk writer is not running")
        self._jobs.put(job)

    def _counted(self, job: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            finally:
                self._slots.release()

        return run

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                # Jobs handle their own failures; this keeps the thread alive for the others.
                log.exception("recording job failed")


class _SegmentFile:
    """The writer-thread half of a segment: the open container. Touched only in that thread."""

    def __init__(self, path: Path, kind: str, start_s: float, keys: SealKeys | None) -> None:
        self.path = path
        self.kind = kind
        self.start_s = start_s
        self.keys = keys
        self.sink: SealedWriter | None = None
        self.clock = CLOCK_RATE[kind]
        self.time_base = fractions.Fraction(1, self.clock)
        self.container: Any = None
        self.stream: Any = None
        self.error: str | None = None
        self.failure: WriteFailure | None = None
        self.frames = 0
        self.last_pts = 0
        self.last_step = 0

    def write(self, data: bytes, pts: int, keyframe: bool) -> None:
        if self.error is not None:
            return
        try:
            if self.container is None:
                self._open(data)
            packet = av.Packet(data)
            packet.pts = packet.dts = pts
            packet.time_base = self.time_base
            packet.stream = self.stream
            packet.is_keyframe = keyframe
            self.container.mux_one(packet)
        except Exception as exc:
            self.failure = failure_of(exc)
            if self.failure is WriteFailure.DISK_FULL:
                log.warning("writing %s failed: the disk is full", self.path)
            else:
                log.exception("writing %s failed", self.path)
            self.error = f"{type(exc).__name__}: {exc}"
            return
        if self.frames:
            self.last_step = pts - self.last_pts
        self.frames += 1
        self.last_pts = pts

    def _open(self, first: bytes) -> None:
        if self.keys is not None:
            self.sink = SealedWriter(self.path, self.keys)
        target: Any = self.sink or str(self.path)
        container = av.open(target, mode="w", format="webm", options=MUXER_OPTIONS)
        try:
            container.metadata[START_TAG] = f"{self.start_s:.6f}"
            stream: Any
            if self.kind == "video":
                width, height = vp8_size(first)
                stream = container.add_mux_stream("vp8", width=width, height=height)
            else:
                # Opus in Matroska needs its header (channels, pre-skip) as codec private
                # data; an encoder context writes it (it encodes nothing). WebRTC signals
                # Opus as stereo whatever the packets carry.
                stream = container.add_stream("libopus", rate=self.clock, layout="stereo")
            stream.time_base = fractions.Fraction(1, 1000)
        except Exception:
            container.close()
            raise
        self.container, self.stream = container, stream

    @property
    def duration_s(self) -> float:
        if not self.frames:
            return 0.0
        # The last frame lasts as long as the one before it (RTP carries no durations).
        step = self.last_step or (self.clock // 50 if self.kind == "audio" else self.clock // 30)
        return (self.last_pts + step) / self.clock

    def close(self) -> tuple[str | None, int]:
        """Closes the container and returns the SHA-256 of what was recorded (None if there
        is no file) and its size."""
        # The sink too when the container fails: it writes the final record.
        for closing in (self.container, self.sink):
            if closing is None:
                continue
            try:
                closing.close()
            except Exception as exc:
                # A writer that already found the disk full fails to close for the same reason
                # (PyAV reports our file's error as its own callback error).
                self.failure = self.failure or failure_of(exc)
                if self.failure is WriteFailure.DISK_FULL:
                    log.warning("closing %s failed: the disk is full", self.path)
                else:
                    log.exception("closing %s failed", self.path)
                self.error = self.error or f"{type(exc).__name__}: {exc}"
        self.container = self.sink = None
        if not self.path.exists():
            return None, 0
        if self.keys is not None:
            # Read back through the seal: what is hashed is what a reader will get.
            return plaintext_sha256(self.path, self.keys, unfinished_ok=self.error is not None)
        return file_sha256(self.path)


class SegmentWriter:
    """One track's segment: `push` takes the track's frames on the event loop (use it as a
    `Publication` listener), `close` ends the segment.

    Video starts at a keyframe: frames before the first one are dropped and `request_keyframe`
    is called (use `Publication.want_keyframe`, which rate-limits). The same happens after a
    gap or a frame dropped for a full queue. `session_clock` gives seconds since the recording
    started; it places the first frame. `on_opened` is called (on the loop) with the segment's
    info when its first frame is accepted; the file is created by the writer thread just
    after. `on_failed(info, why)` is called (on the loop) when the writer first fails (the
    disk full, ...): later frames are not written, and `close` reports the segment FAILED.
    Nothing is created if no frame ever comes."""

    def __init__(
        self,
        writer: DiskWriter,
        path: Path,
        kind: str,
        *,
        session_clock: Callable[[], float],
        request_keyframe: Callable[[], None] | None = None,
        on_opened: Callable[[SegmentInfo], None] | None = None,
        on_failed: Callable[[SegmentInfo, WriteFailure], None] | None = None,
        keys: SealKeys | None = None,
        track_id: str = "",
        participant: str = "",
        source: str = "",
        label: str = "",
    ) -> None:
        if kind not in CLOCK_RATE:
            raise ValueError(f"cannot record {kind!r} tracks")
        self._writer = writer
        self._clock = CLOCK_RATE[kind]
        self._session_clock = session_clock
        self._request_keyframe = request_keyframe
        self._on_opened = on_opened
        self._on_failed = on_failed
        self._keys = keys
        self._info = SegmentInfo(
            path=path,
            kind=kind,
            codec=CODEC[kind],
            start_s=0.0,
            state=SegmentState.RECORDING,
            track_id=track_id,
            participant=participant,
            source=source,
            label=label,
        )
        self._file: _SegmentFile | None = None
        self._first_timestamp: int | None = None
        self._last_pts = -1
        self._needs_keyframe = kind == "video"
        self._closing: asyncio.Future[SegmentInfo | None] | None = None
        self.frames = 0
        self.dropped = 0

    @property
    def info(self) -> SegmentInfo:
        return self._info

    def push(self, frame: EncodedFrame) -> None:
        if self._closing is not None:
            return
        if self._first_timestamp is None:
            if self._needs_keyframe and not frame.keyframe:
                self._drop_until_keyframe()
                return
            self._begin(frame)
        assert self._first_timestamp is not None and self._file is not None
        pts = frame.timestamp - self._first_timestamp
        if pts <= self._last_pts:
            self.dropped += 1  # out of order or repeated: the muxer needs increasing times
            return
        if self._info.kind == "video":
            if not frame.keyframe and pts - self._last_pts > VIDEO_GAP_S * self._clock:
                self._needs_keyframe = True
            if self._needs_keyframe:
                if not frame.keyframe:
                    self._drop_until_keyframe()
                    return
                self._needs_keyframe = False
        segment_file = self._file
        data = frame.data
        keyframe = frame.keyframe
        if not self._writer.try_submit(lambda: self._write(segment_file, data, pts, keyframe)):
            self.dropped += 1
            if self._info.kind == "video":
                # Whatever follows refers to the frame just lost.
                self._needs_keyframe = True
                self._ask_keyframe()
            return
        self.frames += 1
        self._last_pts = pts

    def _write(self, segment_file: _SegmentFile, data: bytes, pts: int, keyframe: bool) -> None:
        """In the writer thread: one frame, and the first failure told to the loop."""
        failed_before = segment_file.failure is not None
        segment_file.write(data, pts, keyframe)
        failure = segment_file.failure
        if failure is None or failed_before or self._on_failed is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
            self._writer.loop.call_soon_threadsafe(self._on_failed, self._info, failure)

    def _begin(self, frame: EncodedFrame) -> None:
        start_s = self._session_clock()
        self._first_timestamp = frame.timestamp
        self._needs_keyframe = False
        self._info = replace(self._info, start_s=start_s)
        self._file = _SegmentFile(self._info.path, self._info.kind, start_s, self._keys)
        if self._on_opened is not None:
            self._on_opened(self._info)

    def _drop_until_keyframe(self) -> None:
        self.dropped += 1
        self._ask_keyframe()

    def _ask_keyframe(self) -> None:
        if self._request_keyframe is not None:
            self._request_keyframe()

    def close(self) -> asyncio.Future[SegmentInfo | None]:
        """Ends the segment: the result is its final info (COMPLETE, or FAILED if the writer
        failed), once everything queued is written and the file is hashed; None if the segment
        never got a frame. Calling it again returns the same future."""
        if self._closing is not None:
            return self._closing
        loop = self._writer.loop
        self._closing = loop.create_future()
        segment_file = self._file
        if segment_file is None:
            self._closing.set_result(None)
            return self._closing
        base = replace(self._info, frames=self.frames, dropped=self.dropped)
        future = self._closing

        def finish() -> None:
            digest, size = segment_file.close()
            info = replace(
                base,
                state=SegmentState.FAILED if segment_file.error else SegmentState.COMPLETE,
                duration_s=segment_file.duration_s,
                size_bytes=size,
                sha256=digest,
                # Frames queued but not written (the writer failed) are not in the file.
                frames=segment_file.frames,
                dropped=base.dropped + base.frames - segment_file.frames,
                error=segment_file.error,
            )
            _resolve_threadsafe(loop, future, info)

        self._writer.submit(finish)
        return future


def _resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[SegmentInfo | None], info: SegmentInfo
) -> None:
    def resolve() -> None:
        if not future.done():
            future.set_result(info)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        log.warning("segment %s closed after its event loop", info.path)


def vp8_size(keyframe: bytes) -> tuple[int, int]:
    """Width and height from a VP8 keyframe's header (RFC 6386, 9.1)."""
    if len(keyframe) < 10 or keyframe[0] & 1 or keyframe[3:6] != b"\x9d\x01\x2a":
        raise ValueError("not a VP8 keyframe")
    width = int.from_bytes(keyframe[6:8], "little") & 0x3FFF
    height = int.from_bytes(keyframe[8:10], "little") & 0x3FFF
    return width, height


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def recover_segment(path: Path, keys: SealKeys | None = None) -> SegmentInfo:
    """Describes a segment file a dead process left open, without changing it: the duration
    of what demuxes, the session-clock start from its tag, SHA-256 and size (of the plaintext,
    up to its last whole chunk, if sealed); state INTERRUPTED. Blocking (it reads the whole
    file): call it off the event loop, e.g. with `asyncio.to_thread`."""
    info = SegmentInfo(path=path, kind="", codec="", start_s=0.0, state=SegmentState.INTERRUPTED)
    if keys is not None and path.stat().st_size == 0:
        # Killed before the seal's header was out: nothing was recorded.
        return replace(info, sha256=hashlib.sha256(b"").hexdigest(), error="unreadable: empty")
    if keys is None:
        digest, size = file_sha256(path)
    else:
        digest, size = plaintext_sha256(path, keys, unfinished_ok=True)
    info = replace(info, sha256=digest, size_bytes=size)
    with contextlib.ExitStack() as stack:
        try:
            container = stack.enter_context(media_input(path, keys, unfinished_ok=True))
        except av.FFmpegError as exc:
            # Killed before the header was out: an empty or partial file, nothing to play.
            return replace(info, error=f"unreadable: {exc}")
        if not container.streams:
            return replace(info, error="no stream")
        stream = container.streams[0]
        kind = stream.type
        tag = container.metadata.get(START_TAG)
        first: int | None = None
        last = 0
        step = 0
        frames = 0
        error = None
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                if first is None:
                    first = packet.pts
                step = packet.duration or (packet.pts - last if frames else 0)
                last = packet.pts
                frames += 1
        except av.FFmpegError as exc:
            # The torn end of the file: everything before it counts.
            error = f"truncated: {exc}"
        time_base = stream.time_base or fractions.Fraction(1, 1000)
        duration = float((last - (first or 0) + step) * time_base) if frames else 0.0
        return replace(
            info,
            kind=kind,
            codec=stream.codec_context.name,
            start_s=float(tag) if tag else 0.0,
            duration_s=duration,
            frames=frames,
            error=error,
        )
