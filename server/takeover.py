"""Cleaning up after a dead worker (behind Redis), by whichever live worker takes the lease on it.

A worker that dies (`kill -9`, a lost machine, or a clean stop: server/placement.py) leaves
its recorders' segments open in the record and its rooms placed on it. One live worker at a
time, under a lease on the dead incarnation:

1. closes the dead one's open segments (their rows name its incarnation), hashed and marked
   interrupted, without ending their sessions: a room goes on at the worker its next join
   places it on, which takes it over (LiveRoomService.take_over) and records new segments;
   renders it had under way start again here;
2. gives each of its rooms the empty-room grace to be placed on a live worker; a room still
   placed on the dead one then ends as aborted, as a room everyone left would
   (LiveRoomService.end_lost), its composite made here;
3. forgets the dead incarnation.

A worker restarted on the same node is a new incarnation: its previous one is cleaned up
after like any other dead worker, and its own new rows are never touched. Every worker reads
the others' files: data_dir is shared storage (README, Deployment)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from rooms.errors import DomainError, Unavailable
from rooms.model import ConsultationId
from rooms.room_service import LiveRoomService
from rooms.store import RecordStore
from server.composites import Composites
from server.placement import RedisPlacement
from server.recording import SessionRecordings
from server.redis_conn import REDIS_AWAY
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

# How often the live workers look for dead ones.
EVERY_S = 1.0
# The lease outlasts the room's grace by this much: the cleanup is done long before it lapses,
# unless the cleaner died too (then another takes over once it lapses).
LEASE_MARGIN_S = 60.0


class DeadWorkerCleanup:
    """Life cycle: `await start()` (looks for dead workers every `every_s` until stopped),
    `await stop()` (cancels cleanups under way; their leases lapse and another worker does
    them again)."""

    def __init__(
        self,
        placement: RedisPlacement,
        store: RecordStore,
        rooms: LiveRoomService,
        recordings: SessionRecordings,
        composites: Composites,
        empty_room_grace_s: float,
        *,
        every_s: float = EVERY_S,
    ) -> None:
        self._placement = placement
        self._store = store
        self._rooms = rooms
        self._recordings = recordings
        self._composites = composites
        self._grace_s = empty_room_grace_s
        self._every_s = every_s
        self._lease_s = empty_room_grace_s + LEASE_MARGIN_S
        self._loop: asyncio.Task[None] | None = None
        self._cleanups = TaskSet("dead worker cleanup")
        self._under_way: set[str] = set()
        # The dead incarnations this worker cleaned up after, oldest first (logs, tests).
        self.cleaned_up: list[str] = []

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._look_forever(), name="dead-worker-cleanup")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        await self._cleanups.cancel_all()

    async def _look_forever(self) -> None:
        away = False
        while True:
            try:
                await self._look()
                away = False
            except Unavailable:
                # Redis or the database away: the dead stay listed, looked at again later.
                if not away:
                    log.warning("dead worker cleanup waits: Redis or the database is away")
                away = True
            except Exception:
                # One bad pass must not end the looking for good.
                log.exception("looking for dead workers failed")
            await asyncio.sleep(self._every_s)

    async def _look(self) -> None:
        for dead in await self._placement.dead_workers():
            if dead in self._under_way or dead == self._placement.worker_id:
                # Our own heartbeat lapsed (a stalled loop, Redis away): we are not dead.
                continue
            if await self._placement.lease(dead, self._lease_s):
                log.warning("worker %s is dead: cleaning up after it", dead)
                self._under_way.add(dead)
                self._cleanups.start(self._clean_up_after(dead))

    async def _clean_up_after(self, dead: str) -> None:
        try:
            if not await self._still_dead(dead):
                return
            await self._recover(dead)
            await self._end_rooms_nobody_took(dead)
            if not await self._still_dead(dead):
                return
            await self._placement.forget(dead)
            self.cleaned_up.append(dead)
            log.info("cleaned up after worker %s", dead)
        except (Unavailable, *REDIS_AWAY) as exc:
            # Left to the lease's lapse: this worker or another does it again then.
            log.warning("cleaning up after %s stopped (%s); it is done again later", dead, exc)
        finally:
            self._under_way.discard(dead)

    async def _still_dead(self, dead: str) -> bool:
        """A worker whose heartbeat only lapsed (its loop stalled) registers again under the
        same incarnation: what it still holds is its own again."""
        if await self._placement.alive({dead}):
            log.warning("worker %s is alive again: its cleanup stops", dead)
            return False
        return True

    async def _recover(self, dead: str) -> None:
        touched = await self._recordings.recover_worker(dead)
        await self._composites.resume(lambda row: row.node == dead)
        async with self._store.reading() as tx:
            still_open = {s.id for s in await tx.list_open_sessions()}
        for session_id, consultation_id in touched.items():
            if session_id not in still_open:
                # It ended before its segments were closed: its composite lacked them.
                await self._composites.render_later(consultation_id, session_id)
        log.info("worker %s: open segments of %d session(s) closed", dead, len(touched))

    async def _end_rooms_nobody_took(self, dead: str) -> None:
        rooms = await self._placement.rooms_of(dead)
        if not rooms:
            return
        await asyncio.sleep(self._grace_s)
        for consultation_id in sorted(rooms):

            async def still_on_dead(c: ConsultationId = consultation_id) -> bool:
                # Placing a room on a live worker takes it out of the dead one's set (in the
                # same script).
                on_dead = c in await self._placement.rooms_of(dead)
                return on_dead and await self._still_dead(dead)

            try:
                ended = await self._rooms.end_lost(consultation_id, still_on_dead)
            except DomainError as exc:
                log.warning("room %s of dead %s left as it is: %s", consultation_id, dead, exc)
                continue
            if ended is not None:
                log.info("room %s of dead worker %s ended as aborted", consultation_id, dead)


TAKEOVER = web.AppKey("takeover", DeadWorkerCleanup)


def attach_cleanup(
    app: web.Application,
    placement: RedisPlacement,
    store: RecordStore,
    rooms: LiveRoomService,
    recordings: SessionRecordings,
    composites: Composites,
    empty_room_grace_s: float,
) -> DeadWorkerCleanup:
    """A worker's cleanup after dead ones, in the app's life cycle (attach it after the store
    and the recordings: it stops before they do)."""
    cleanup = DeadWorkerCleanup(placement, store, rooms, recordings, composites, empty_room_grace_s)
    app[TAKEOVER] = cleanup

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await cleanup.start()
        yield
        await cleanup.stop()

    app.cleanup_ctx.append(lifecycle)
    return cleanup
