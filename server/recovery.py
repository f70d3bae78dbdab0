"""What a starting server does about what a predecessor that died left open, alone (one node,
no Redis): everything left open was its own, so nothing is still being served. Behind Redis a
restarted worker is a new incarnation, and its previous one a dead worker like any other,
cleaned up after by whichever live worker takes the lease (server/takeover.py): nothing here.

- Recordings the record shows as being written are closed as interrupted and their sessions
  aborted (SessionRecordings.recover); their composites are made; renders that were under way
  start again.
- Every other live session keeps its session (the clinic's browser reconnects by itself), but
  the seats of the dead connections are closed as `server_lost`. If nobody comes back within
  the empty-room grace, the session ends as aborted, as a room everyone left would."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from rooms.consultations import ConsultationService
from rooms.errors import DomainError
from rooms.live import PresenceStore
from rooms.model import ConsultationId, SessionId
from rooms.store import RecordStore
from server.composites import Composites
from server.recording import SessionRecordings

log = logging.getLogger(__name__)


class CrashRecovery:
    def __init__(
        self,
        store: RecordStore,
        service: ConsultationService,
        presence: PresenceStore,
        recordings: SessionRecordings,
        composites: Composites,
        grace_s: float,
        *,
        alone: bool = True,
    ) -> None:
        self._alone = alone
        self._store = store
        self._service = service
        self._presence = presence
        self._recordings = recordings
        self._composites = composites
        self._grace_s = grace_s
        self._waits: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self._alone:
            return
        await self._composites.resume()
        async with self._store.reading() as tx:
            left_open = await tx.list_open_sessions()
        for session in left_open:
            closed = await self._service.close_seats_of_a_lost_server(session)
            log.info(
                "session %s was live when the server died: %d seat(s) closed",
                session.id,
                len(closed),
            )
        aborted = await self._recordings.recover(self._abort)
        for consultation_id, session_id in aborted:
            await self._composites.render_later(consultation_id, session_id)
        ended = {session_id for _, session_id in aborted}
        for session in left_open:
            if session.id not in ended:
                wait = asyncio.create_task(
                    self._end_if_nobody_returns(session.consultation_id, session.id)
                )
                self._waits.add(wait)
                wait.add_done_callback(self._waits.discard)

    @property
    def waiting(self) -> int:
        """Sessions still inside their grace for someone to come back."""
        return len(self._waits)

    async def stop(self) -> None:
        for wait in list(self._waits):
            wait.cancel()
        for wait in list(self._waits):
            with contextlib.suppress(asyncio.CancelledError):
                await wait

    async def _abort(self, consultation_id: ConsultationId, session_id: SessionId) -> None:
        try:
            await self._service.end_session(None, consultation_id, session_id, "aborted")
        except DomainError as exc:
            log.warning("session %s left as it is: %s", session_id, exc)

    async def _end_if_nobody_returns(
        self, consultation_id: ConsultationId, session_id: SessionId
    ) -> None:
        await asyncio.sleep(self._grace_s)
        # Someone who came back reopened the room; its own empty-room watch ends it later.
        async with self._presence.lock(consultation_id):
            room = await self._presence.get(consultation_id)
            if room is not None and room.session_id == session_id:
                return
            await self._abort(consultation_id, session_id)
