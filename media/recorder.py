"""Recording a room: one segment file per published track, all on one session clock, written
by one writer thread per recorder (see media/recording.py). The recorder knows tracks and
publications only; the server decides who may record, names the recording and keeps the
segment infos in the record (through the callbacks)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from media.forwarding import Publication
from media.frames import EncodedFrame
from media.hub import MediaHub, TrackInfo
from media.recording import (
    DEFAULT_MAX_PENDING,
    DiskWriter,
    SegmentInfo,
    SegmentWriter,
    WriteFailure,
)
from media.sealed import SealKeys

log = logging.getLogger(__name__)

# Called (on the event loop, one at a time, in order) with each segment's info.
SegmentCallback = Callable[[SegmentInfo], Awaitable[None]]
# Ids that become file names: the server's own, never text from a client.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class _Recorded:
    info: TrackInfo
    publication: Publication
    segment: SegmentWriter
    listener: Callable[[EncodedFrame], None]


class RoomRecorder:
    """Records the tracks it is given into `directory`, each segment named
    `{recording_id}_{track_id}_{n}.webm` (n counts the recorder's segments from 1).

    Life cycle: `await start()` (starts the session clock and the writer thread), then
    `add_track`/`remove_track` (or `follow(hub, room)` to track a room), then `await stop()`,
    which closes every open segment, waits for the callbacks and returns the info of every
    segment of the recording (COMPLETE or FAILED).

    `on_segment_opened(info)` is awaited when a segment's first frame arrives (state
    RECORDING, `start_s` set: store it, so that a crash leaves the record pointing at the file);
    `on_segment_closed(info)` when it is closed and hashed. Both run on the event loop, one at a
    time, opened before closed. `on_failed(why)` is called once, on the loop, when a segment's
    writer first fails (the disk full): the recording cannot go on as it was.

    With `keys`, every segment is sealed as it is written (media/sealed.py); without, plain
    WebM files (tools and tests that read them directly)."""

    def __init__(
        self,
        directory: Path,
        recording_id: str,
        *,
        on_segment_opened: SegmentCallback | None = None,
        on_segment_closed: SegmentCallback | None = None,
        on_failed: Callable[[WriteFailure], None] | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        keys: SealKeys | None = None,
    ) -> None:
        if not _SAFE_ID.fullmatch(recording_id):
            raise ValueError("a recording id is 1-64 letters, digits, '_' or '-'")
        self.directory = directory
        self.recording_id = recording_id
        self._on_opened = on_segment_opened
        self._on_closed = on_segment_closed
        self._on_failed = on_failed
        self.failure: WriteFailure | None = None
        self._keys = keys
        self._writer = DiskWriter(max_pending, name=f"recording-{recording_id}")
        self._tracks: dict[str, _Recorded] = {}
        self._closing: set[asyncio.Future[SegmentInfo | None]] = set()
        self._segments: list[SegmentInfo] = []
        self._sequence = 0
        self._origin: float | None = None
        # Wall-clock time (time.time()) of session clock 0, for the record.
        self.started_at: float | None = None
        self._callbacks: asyncio.Queue[tuple[SegmentCallback, SegmentInfo] | None] = asyncio.Queue()
        self._callback_task: asyncio.Task[None] | None = None
        self._followed: tuple[MediaHub, str] | None = None
        self._label_for: Callable[[TrackInfo], str] = lambda _: ""

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._origin is not None:
            raise RuntimeError("the recorder is already started")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        self._writer.start()
        self._origin = time.monotonic()
        self.started_at = time.time()
        self._callback_task = asyncio.ensure_future(self._run_callbacks())

    async def stop(self) -> list[SegmentInfo]:
        """Closes every open segment; returns all segments of the recording, in the order
        they were closed."""
        if self._origin is None:
            return []
        self.unfollow()
        for track_id in list(self._tracks):
            self.remove_track(track_id)
        while self._closing:
            await asyncio.gather(*self._closing)
        await self._writer.stop()
        if self._callback_task is not None:
            await self._callbacks.put(None)
            await self._callback_task
            self._callback_task = None
        return list(self._segments)

    def session_time(self) -> float:
        """Seconds on the session clock (since `start()`)."""
        if self._origin is None:
            raise RuntimeError("the recorder is not started")
        return time.monotonic() - self._origin

    @property
    def segments(self) -> list[SegmentInfo]:
        """Infos of the segments closed so far."""
        return list(self._segments)

    @property
    def recording(self) -> list[TrackInfo]:
        """The tracks being recorded now."""
        return [r.info for r in self._tracks.values()]

    @property
    def dropped(self) -> int:
        """Frames the open segments lost so far (full queue, waiting for a keyframe)."""
        return sum(r.segment.dropped for r in self._tracks.values())

    # --- tracks ------------------------------------------------------------------------------

    def add_track(self, info: TrackInfo, publication: Publication, label: str = "") -> None:
        """Records `publication` as a new segment from its next frame (video: its next
        keyframe, which is requested). A track id already recorded from another publication
        (republished) closes the old segment first; the same publication again is ignored.
        `label` is for the composite (e.g. "Dr Li · consultant")."""
        if self._origin is None:
            raise RuntimeError("start the recorder before adding tracks")
        if not _SAFE_ID.fullmatch(info.track_id):
            raise ValueError(f"unsafe track id {info.track_id!r}")
        current = self._tracks.get(info.track_id)
        if current is not None:
            if current.publication is publication:
                return
            self.remove_track(info.track_id)
        self._sequence += 1
        path = self.directory / f"{self.recording_id}_{info.track_id}_{self._sequence}.webm"
        segment = SegmentWriter(
            self._writer,
            path,
            info.kind,
            session_clock=self.session_time,
            request_keyframe=publication.want_keyframe,
            on_opened=self._opened,
            on_failed=self._failed,
            keys=self._keys,
            track_id=info.track_id,
            participant=info.participant,
            source=info.source,
            label=label,
        )

        def listener(frame: EncodedFrame) -> None:
            # Called inside the relay's push: a recording fault must not stop forwarding.
            try:
                segment.push(frame)
            except Exception:
                log.exception("recording %s failed", info.track_id)

        publication.add_listener(listener)
        self._tracks[info.track_id] = _Recorded(info, publication, segment, listener)
        if info.kind == "video":
            publication.want_keyframe()

    def _failed(self, info: SegmentInfo, why: WriteFailure) -> None:
        log.warning("recording %s: segment %s failed (%s)", self.recording_id, info.path.name, why)
        if self.failure is None:
            self.failure = why
            if self._on_failed is not None:
                self._on_failed(why)

    def remove_track(self, track_id: str) -> asyncio.Future[SegmentInfo | None] | None:
        """Stops recording a track and closes its segment. Returns a future of the closed
        segment's info (None if it never got a frame), or None if the track was not recorded.
        Awaiting it is optional: `stop()` waits for every close."""
        recorded = self._tracks.pop(track_id, None)
        if recorded is None:
            return None
        recorded.publication.remove_listener(recorded.listener)
        closing = recorded.segment.close()
        self._closing.add(closing)
        closing.add_done_callback(self._closed)
        return closing

    # --- following a room --------------------------------------------------------------------

    def follow(
        self, hub: MediaHub, room: str, label_for: Callable[[TrackInfo], str] | None = None
    ) -> None:
        """Records every track of `room`, now and as they are published, until `unfollow()`
        or `stop()`; a track unpublished in the hub closes its segment. `label_for` names each
        track's tile in the composite."""
        if self._followed is not None:
            raise RuntimeError("the recorder already follows a room")
        self._label_for = label_for or (lambda _: "")
        self._followed = (hub, room)
        hub.watch_tracks(room, self._published, self._unpublished)

    def unfollow(self) -> None:
        if self._followed is not None:
            hub, room = self._followed
            hub.unwatch_tracks(room)
            self._followed = None

    def _published(self, info: TrackInfo, publication: Publication) -> None:
        self.add_track(info, publication, self._label_for(info))

    def _unpublished(self, info: TrackInfo) -> None:
        self.remove_track(info.track_id)

    # --- callbacks ---------------------------------------------------------------------------

    def _opened(self, info: SegmentInfo) -> None:
        if self._on_opened is not None:
            self._callbacks.put_nowait((self._on_opened, info))

    def _closed(self, closing: asyncio.Future[SegmentInfo | None]) -> None:
        self._closing.discard(closing)
        info = closing.result()
        if info is None:
            return
        self._segments.append(info)
        if self._on_closed is not None:
            self._callbacks.put_nowait((self._on_closed, info))

    async def _run_callbacks(self) -> None:
        while (item := await self._callbacks.get()) is not None:
            callback, info = item
            try:
                await callback(info)
            except Exception:
                log.exception("segment callback failed for %s", info.path)
