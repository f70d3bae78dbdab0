"""The session recorders: one media.recorder.RoomRecorder per recorded room, its segments kept
in the record as they open and close, and closing what a dead server (or, behind Redis, a dead
worker: server/takeover.py) left being written.

The room service decides when recording starts and stops (consent, permission) and, under the
room's lock, has this carry it out (rooms.room_service.RoomRecorders): a start either records
or raises, a stop writes nothing more at once and closes and hashes the segments in the
background, so that `session_ended` is not held back by hashing. Files live under
`{data_dir}/recordings/{session_id}/`, sealed with the configured keys (media/sealed.py); the
record keeps their path relative to `data_dir` and the SHA-256 of what was recorded (the
plaintext), and clients only ever see recording ids."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from media.hub import MediaHub
from media.recorder import RoomRecorder
from media.recording import SegmentInfo, SegmentState, WriteFailure, recover_segment
from media.sealed import SealKeys
from rooms.clock import Clock, utc_now
from rooms.live import PresenceStore
from rooms.model import (
    ConsultationId,
    EventKind,
    ParticipantId,
    Recording,
    RecordingId,
    RecordingKind,
    RecordingState,
    SessionId,
)
from rooms.store import RecordRepository, RecordStore
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

# Called with a session whose recording ended, to make its composite.
SessionEnded = Callable[[ConsultationId, SessionId], Awaitable[None]]
# Called when a room's recorder cannot go on, with why (media.recording.WriteFailure).
RecordingFailed = Callable[[ConsultationId, str], Awaitable[None]]

_STATE_OF_SEGMENT = {
    SegmentState.RECORDING: RecordingState.RECORDING,
    SegmentState.COMPLETE: RecordingState.COMPLETE,
    SegmentState.INTERRUPTED: RecordingState.INTERRUPTED,
    SegmentState.FAILED: RecordingState.FAILED,
}


def media_type_of(kind: str) -> str:
    return "video/webm" if kind == "video" else "audio/webm"


@dataclass
class _Running:
    consultation_id: ConsultationId
    session_id: SessionId
    recorder: RoomRecorder
    # Seconds from the session's start to the recorder's clock zero.
    offset_s: float
    # Segment rows by file path, to complete them when the segment closes.
    rows: dict[Path, Recording] = field(default_factory=dict)


class SessionRecordings:
    def __init__(
        self,
        store: RecordStore,
        hub: MediaHub,
        presence: PresenceStore,
        data_dir: Path,
        keys: SealKeys,
        on_session_ended: SessionEnded | None = None,
        clock: Clock = utc_now,
        node: str | None = None,
        on_failure: RecordingFailed | None = None,
    ) -> None:
        """`node` names this worker in the segment rows it writes, for whoever recovers them
        after it died: behind Redis its incarnation (placement.worker_id: a restarted worker
        is another one and never takes its live segments for a dead one's), alone the config
        node_id. `on_failure(room, why)` is told when a room's recorder fails (the disk full),
        to stop the recording through the room."""
        self._node = node
        self._on_failure = on_failure
        self._store = store
        self._keys = keys
        self._hub = hub
        self._presence = presence
        self._data_dir = data_dir
        self._on_session_ended = on_session_ended
        self._now = clock
        self._running: dict[ConsultationId, _Running] = {}
        # Stopped recorders still closing and hashing their segments, per room.
        self._closing: dict[ConsultationId, set[asyncio.Future[None]]] = {}
        # Sessions this node recorded: it makes their composites when they end.
        self._recorded: set[SessionId] = set()
        self._tasks = TaskSet("recording")

    @property
    def recording(self) -> list[ConsultationId]:
        """The rooms being recorded now."""
        return list(self._running)

    async def close(self) -> None:
        """Server shutdown: every open segment is closed and hashed (complete, not
        interrupted), and pending composites handed over; the sessions stay as they are."""
        for consultation_id in list(self._running):
            await self.stop(consultation_id)
        await self._tasks.wait()

    async def wait(self) -> None:
        """Until every stopped recorder has closed its segments and handed its session to the
        composites (tests)."""
        await self._tasks.wait()

    async def stop(self, consultation_id: ConsultationId) -> None:
        running = self._running.pop(consultation_id, None)
        if running is None:
            return
        recorder = running.recorder
        # Not one frame more from here on; closing and hashing go on in the background.
        recorder.unfollow()
        for info in recorder.recording:
            recorder.remove_track(info.track_id)
        closing = self._closing.setdefault(consultation_id, set())
        task = self._tasks.start(self._finish(recorder))
        closing.add(task)
        task.add_done_callback(closing.discard)

    async def reconcile(self) -> None:
        """Orders from other nodes may have been lost (Redis away): a recorder whose room no
        longer shows it recording is stopped, and one whose session is over wraps it up."""
        for consultation_id, running in list(self._running.items()):
            room = await self._presence.get(consultation_id)
            if room is not None and room.recording is not None:
                continue
            await self.stop(consultation_id)
            if room is None or room.session_id != running.session_id:
                self.session_ended(consultation_id, running.session_id)

    def session_ended(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        if session_id not in self._recorded:
            return  # nothing recorded here (another node's, or none)
        self._recorded.discard(session_id)
        if self._on_session_ended is not None:
            closing = list(self._closing.get(consultation_id, ()))
            self._tasks.start(self._render_after(closing, consultation_id, session_id))

    def adopt(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        """This worker took the room over (rooms.room_service.RoomRecorders.adopt)."""
        self._recorded.add(session_id)

    async def _finish(self, recorder: RoomRecorder) -> None:
        await recorder.stop()

    async def _render_after(
        self,
        closing: list[asyncio.Future[None]],
        consultation_id: ConsultationId,
        session_id: SessionId,
    ) -> None:
        await asyncio.gather(*closing, return_exceptions=True)
        assert self._on_session_ended is not None  # checked by session_ended
        await self._on_session_ended(consultation_id, session_id)

    async def start(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        if consultation_id in self._running:
            # The room's lock orders starts and stops: the room says not recording.
            raise RuntimeError(f"a recorder of {consultation_id} is still running")
        async with self._store.reading() as tx:
            sessions = await tx.list_sessions(consultation_id)
        session = next(s for s in sessions if s.id == session_id)
        # A fresh id per recorder: the files of a recording taken over from a dead worker
        # ({recording_id}_{track}_{n}.webm, n from 1 again) never collide with its files.
        recording_id = f"r{uuid.uuid4().hex[:12]}"
        directory = self._data_dir / "recordings" / session_id
        running: _Running

        async def opened(info: SegmentInfo) -> None:
            await self._segment_opened(running, info)

        async def closed(info: SegmentInfo) -> None:
            await self._segment_closed(running, info)

        def failed(why: WriteFailure) -> None:
            if self._on_failure is not None:
                self._tasks.start(self._on_failure(consultation_id, why.value))

        recorder = RoomRecorder(
            directory,
            recording_id,
            on_segment_opened=opened,
            on_segment_closed=closed,
            on_failed=failed,
            keys=self._keys,
        )
        await recorder.start()
        assert recorder.started_at is not None  # set by start()
        running = _Running(
            consultation_id,
            session_id,
            recorder,
            offset_s=recorder.started_at - session.started_at.timestamp(),
        )
        self._running[consultation_id] = running
        self._recorded.add(session_id)
        # Tile labels come from the record (name, role) when the composite is made.
        recorder.follow(self._hub, consultation_id)

    async def _segment_opened(self, running: _Running, info: SegmentInfo) -> None:
        # When its first frame arrived, not when this callback got its turn.
        origin = running.recorder.started_at or 0.0
        first_frame_at = datetime.fromtimestamp(origin + info.start_s, UTC)
        room = await self._presence.get(running.consultation_id)
        who = room.participants.get(ParticipantId(info.participant)) if room else None
        row = Recording(
            id=RecordingId(f"rec_{uuid.uuid4().hex[:16]}"),
            session_id=running.session_id,
            track=info.track_id,
            kind=RecordingKind.TRACK.value,
            media_type=media_type_of(info.kind),
            sha256=None,
            duration_s=None,
            size_bytes=None,
            state=RecordingState.RECORDING.value,
            started_at=first_frame_at,
            ended_at=None,
            participant_id=info.participant,
            name=who.name if who else None,
            role=who.role.value if who else None,
            source=info.source,
            offset_s=round(running.offset_s + info.start_s, 3),
            node=self._node,
        )
        async with self._store.transaction() as tx:
            await tx.add_recording(row, path=self._relative(info.path))
        running.rows[info.path] = row

    async def _segment_closed(self, running: _Running, info: SegmentInfo) -> None:
        row = running.rows.pop(info.path, None)
        if row is None:
            return
        async with self._store.transaction() as tx:
            await tx.update_recording(_closed(row, info, self._now()))

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self._data_dir))

    # --- crash recovery -----------------------------------------------------------------

    async def recover(
        self, end_session: Callable[[ConsultationId, SessionId], Awaitable[None]]
    ) -> list[tuple[ConsultationId, SessionId]]:
        """After a crash of the one server (embedded mode: everything left open was its own):
        every segment the record still shows as being written is closed, hashed and marked
        interrupted (its file is read, never rewritten), the stop is written to its session's
        log, and the session is ended as aborted (`end_session`). Returns the sessions so
        aborted, with their consultations."""
        sessions = await self._close_open_segments(lambda _: True)
        async with self._store.reading() as tx:
            open_sessions = await tx.list_open_sessions()
            for session in open_sessions:
                # Recording, but no segment had opened yet: the log alone says so.
                if session.id not in sessions and await _recording_was_on(tx, session.id):
                    sessions[session.id] = session.consultation_id
        still_open = {s.id for s in open_sessions}
        aborted: list[tuple[ConsultationId, SessionId]] = []
        for session_id, consultation_id in sessions.items():
            if session_id not in still_open:
                continue
            async with self._store.transaction() as tx:
                await tx.append_event(
                    session_id,
                    self._now(),
                    EventKind.RECORDING_STOPPED,
                    None,
                    None,
                    {"reason": "interrupted"},
                )
            await end_session(consultation_id, session_id)
            aborted.append((consultation_id, session_id))
        return aborted

    async def recover_worker(self, worker: str) -> dict[SessionId, ConsultationId]:
        """After `worker` died (behind Redis): the segments whose rows name it and that the
        record still shows as being written are closed, hashed and marked interrupted. Their
        sessions stay as they are: a room goes on at the worker that took it over, which
        records into new segments. Returns the sessions of the segments so closed."""
        return await self._close_open_segments(lambda row: row.node == worker)

    async def _close_open_segments(
        self, whose: Callable[[Recording], bool]
    ) -> dict[SessionId, ConsultationId]:
        async with self._store.reading() as tx:
            open_rows = await tx.list_stored_recordings(state=RecordingState.RECORDING.value)
        sessions: dict[SessionId, ConsultationId] = {}
        for s in open_rows:
            row = s.recording
            if row.kind != RecordingKind.TRACK.value or not whose(row):
                continue
            sessions[row.session_id] = s.consultation_id
            path = self._data_dir / s.path if s.path else None
            recovered = await _recover_row(row, path, self._keys)
            async with self._store.transaction() as tx:
                await tx.update_recording(replace(recovered, ended_at=self._now()))
        return sessions


async def _recording_was_on(tx: RecordRepository, session_id: SessionId) -> bool:
    started = await tx.list_session_events(session_id, EventKind.RECORDING_STARTED, 1)
    stopped = await tx.list_session_events(session_id, EventKind.RECORDING_STOPPED, 1)
    return bool(started) and (not stopped or stopped[-1].seq < started[-1].seq)


async def _recover_row(row: Recording, path: Path | None, keys: SealKeys) -> Recording:
    if path is None or not await asyncio.to_thread(path.exists):
        log.warning("recording %s: its file is gone", row.id)
        return replace(row, state=RecordingState.FAILED.value, size_bytes=0)
    try:
        info = await asyncio.to_thread(recover_segment, path, keys)
    except Exception:
        log.exception("recording %s could not be recovered", row.id)
        return replace(row, state=RecordingState.FAILED.value)
    return replace(
        row,
        state=RecordingState.INTERRUPTED.value,
        sha256=info.sha256,
        duration_s=round(info.duration_s, 3),
        size_bytes=info.size_bytes,
    )


def _closed(row: Recording, info: SegmentInfo, now: datetime) -> Recording:
    return replace(
        row,
        state=_STATE_OF_SEGMENT[info.state].value,
        sha256=info.sha256,
        duration_s=round(info.duration_s, 3),
        size_bytes=info.size_bytes,
        ended_at=now,
    )
