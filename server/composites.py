"""A recorded session's composite: one MP4 anyone can play, made from the session's track
segments in the record, by media.composite in a child process. Made when a recorded session
ends, and again on request (`telemed render`); each run replaces the file and updates the one
composite row of the session."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from media.composite import (
    CompositeJob,
    SegmentRef,
    Stroke,
    Tile,
    remove_partial_outputs,
    run_composite,
)
from media.sealed import SealKeys
from rooms.clock import Clock, utc_now
from rooms.model import (
    ConsultationId,
    ConsultationKind,
    EventKind,
    Recording,
    RecordingId,
    RecordingKind,
    RecordingState,
    SessionId,
)
from rooms.store import RecordStore

log = logging.getLogger(__name__)

# Segments worth composing: complete, or closed after a crash with what they hold.
_USABLE = {RecordingState.COMPLETE.value, RecordingState.INTERRUPTED.value}
# Progress reaches the record at most this often (a render reports every frame or so).
_PROGRESS_EVERY_S = 1.0

ROLE_LABELS = {
    "resident": "居民 resident",
    "guardian": "监护人 guardian",
    "village_doctor": "村医 village doctor",
    "township_doctor": "乡镇医生 township doctor",
    "county_physician": "县医院医生 county physician",
    "provincial_specialist": "省级专家 specialist",
}


class Composites:
    def __init__(
        self,
        store: RecordStore,
        data_dir: Path,
        keys: SealKeys,
        clock: Clock = utc_now,
        node: str | None = None,
    ) -> None:
        """`node` names this server in the composite rows it renders, as in the segment rows
        (server.recording.SessionRecordings), so that a dead one's renders are made again."""
        self._store = store
        self._data_dir = data_dir
        self._keys = keys
        self._node = node
        self._now = clock
        self._tasks: set[asyncio.Task[Recording | None]] = set()
        # One render at a time: each takes a core for a while.
        self._one_at_a_time = asyncio.Lock()

    async def render_later(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        """Starts making the composite in the background (a session just ended)."""
        task = asyncio.ensure_future(self.render(consultation_id, session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self, mine: Callable[[Recording], bool] = lambda _: True) -> None:
        """After a crash: renders that were under way (those `mine` says this node was
        making) start again."""
        async with self._store.reading() as tx:
            stale = await tx.list_stored_recordings(state=RecordingState.RENDERING.value)
        for s in stale:
            if not mine(s.recording):
                continue
            if s.path is not None:
                # The dead server's renderer died with it, perhaps before its clean-up.
                await asyncio.to_thread(remove_partial_outputs, self._data_dir / s.path)
            await self.render_later(s.consultation_id, s.recording.session_id)

    async def wait(self) -> None:
        """Until the background renders are done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def render(
        self,
        consultation_id: ConsultationId,
        session_id: SessionId,
        on_progress: Callable[[float], None] | None = None,
    ) -> Recording | None:
        """Renders the session's composite; returns its row (complete or failed), or None if
        the session has nothing recorded."""
        async with self._one_at_a_time:
            job, row = await self._prepare(consultation_id, session_id)
            if job is None or row is None:
                return None
            last_write = 0.0
            pending: set[asyncio.Task[None]] = set()

            def progress(fraction: float) -> None:
                nonlocal last_write
                if on_progress is not None:
                    on_progress(fraction)
                now = time.monotonic()
                if now - last_write >= _PROGRESS_EVERY_S:
                    last_write = now
                    task = asyncio.ensure_future(self._save(replace(row, progress=fraction)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

            try:
                result = await run_composite(job, progress, keys=self._keys)
            except Exception as exc:
                log.error("composite of session %s failed: %s", session_id, exc)
                await asyncio.gather(*pending, return_exceptions=True)
                failed = replace(row, state=RecordingState.FAILED.value, ended_at=self._now())
                await self._save(failed)
                return failed
            await asyncio.gather(*pending, return_exceptions=True)
            done = replace(
                row,
                state=RecordingState.COMPLETE.value,
                sha256=result.sha256,
                duration_s=round(result.duration_s, 3),
                size_bytes=result.size_bytes,
                progress=1.0,
                ended_at=self._now(),
            )
            await self._save(done)
            return done

    async def _prepare(
        self, consultation_id: ConsultationId, session_id: SessionId
    ) -> tuple[CompositeJob | None, Recording | None]:
        async with self._store.reading() as tx:
            consultation = await tx.get_consultation(consultation_id)
            sessions = {s.id: s for s in await tx.list_sessions(consultation_id)}
            stored = await tx.list_stored_recordings(session_id=session_id)
            # Teaching copies show the strokes the presenter drew; a clinical composite shows
            # the pictures as they were.
            teaching = consultation is not None and consultation.kind is ConsultationKind.TEACHING
            events = (
                await tx.list_session_events(session_id, EventKind.ANNOTATION, 10_000)
                if teaching
                else []
            )
        session = sessions.get(session_id)
        if consultation is None or session is None:
            return None, None
        recordings = [s.recording for s in stored]
        paths = {s.recording.id: s.path for s in stored if s.path}
        segments = [
            r
            for r in recordings
            if r.kind == RecordingKind.TRACK.value
            and r.state in _USABLE
            and (r.duration_s or 0) > 0
            and r.id in paths
        ]
        if not segments:
            return None, None
        # The composite starts with the first recorded frame, not at the session's start.
        base = min(r.offset_s or 0.0 for r in segments)
        tiles: dict[tuple[str, str], list[Recording]] = {}
        for r in sorted(segments, key=lambda r: r.offset_s or 0.0):
            if r.media_type.startswith("video/"):
                tiles.setdefault((r.participant_id or r.track, r.source or ""), []).append(r)

        def ref(r: Recording) -> SegmentRef:
            path = str(self._data_dir / paths[r.id])
            return SegmentRef(
                path, (r.offset_s or 0.0) - base, r.duration_s or 0.0, r.track, r.sha256
            )

        strokes = tuple(
            Stroke(
                track_id=str(e.data["target_track"]),
                at_s=(e.at - session.started_at).total_seconds() - base,
                points=tuple((float(x), float(y)) for x, y in e.data["points"]),
                colour=str(e.data.get("colour") or "#ff0000"),
            )
            for e in events
            if not e.data.get("clear") and e.data.get("points")
        )
        existing = next((r for r in recordings if r.kind == RecordingKind.COMPOSITE.value), None)
        relative = f"recordings/{session_id}/composite.mp4"
        job = CompositeJob(
            output=str(self._data_dir / relative),
            tiles=tuple(Tile(_label(g[0]), tuple(ref(r) for r in g)) for g in tiles.values()),
            audio=tuple(ref(r) for r in segments if r.media_type.startswith("audio/")),
            strokes=strokes,
        )
        row = replace(
            existing
            or Recording(
                id=RecordingId(f"rec_{uuid.uuid4().hex[:16]}"),
                session_id=session_id,
                track="composite",
                kind=RecordingKind.COMPOSITE.value,
                media_type="video/mp4",
                sha256=None,
                duration_s=None,
                size_bytes=None,
                state=RecordingState.RENDERING.value,
                started_at=self._now(),
                ended_at=None,
                offset_s=base,
            ),
            state=RecordingState.RENDERING.value,
            progress=0.0,
            node=self._node,
        )
        async with self._store.transaction() as tx:
            if existing is None:
                await tx.add_recording(row, path=relative)
            else:
                await tx.update_recording(row)
        return job, row

    async def _save(self, row: Recording) -> None:
        async with self._store.transaction() as tx:
            await tx.update_recording(row)


def _label(r: Recording) -> str:
    role = ROLE_LABELS.get(r.role or "", r.role or "")
    source = "" if r.source in (None, "camera") else f" ({r.source})"
    return " · ".join(x for x in (r.name, role) if x) + source
