"""Room presence in Redis, so every server node sees the same rooms (see rooms/live.py for
the in-memory twin). Nothing here is durable: the record lives in the database.

Redis keeps nothing on disk here, so a restarted Redis has forgotten every room. Each node
keeps a mirror of the rooms it has seen and watches an epoch key that a restart loses; when it
is gone, every node writes back its own connections' seats (and the rooms' settings) under the
room locks, and the rooms carry on. While Redis is away, room actions are `unavailable`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import replace

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError
from redis.typing import EncodableT, FieldT

from rooms.errors import RoomRefused, Unavailable
from rooms.live import InMemoryPresence, LiveParticipant, RecordingOn, RoomState
from rooms.model import ConsultationId, ParticipantId, SessionId, UserId
from server.redis_conn import reachable

log = logging.getLogger(__name__)

_PREFIX = "telemed:room:"
# Present while Redis holds what the nodes wrote; a restart without persistence loses it.
_EPOCH_KEY = "telemed:presence-epoch"
# A room's keys expire if a node dies mid-session and nobody closes the room.
_TTL_S = 24 * 3600
# How often each node looks for the epoch (a restarted Redis is noticed within this).
EPOCH_CHECK_S = 0.5


class RedisPresence:
    def __init__(self, url: str, max_connections: int = 50) -> None:
        # A blocking pool: under a burst of joins, callers wait for a connection in turn
        # instead of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, decode_responses=True
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # What this node last read or wrote of each room, to write back after a restart.
        self._mirror = InMemoryPresence()
        self._epoch: str | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self, is_local: Callable[[str], bool]) -> None:
        """Starts watching for a restarted Redis; `is_local(connection)` tells this node's
        connections from the others' (each node writes back only its own seats)."""
        with contextlib.suppress(Unavailable):
            await self._claim_epoch()
        self._watch = asyncio.create_task(self._watch_epoch(is_local), name="presence-epoch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        # The pool was handed in, so closing the client alone would leave its sockets open.
        await self._redis.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        with _reachable():
            await self._redis.ping()

    async def _claim_epoch(self) -> bool:
        """Reads the epoch, setting one if Redis has none; True if it changed since last seen."""
        with _reachable():
            fresh = secrets.token_hex(8)
            await self._redis.set(_EPOCH_KEY, fresh, nx=True)
            current = str(await self._redis.get(_EPOCH_KEY))
        changed = self._epoch is not None and current != self._epoch
        self._epoch = current
        return changed

    async def _watch_epoch(self, is_local: Callable[[str], bool]) -> None:
        away = False
        while True:
            await asyncio.sleep(EPOCH_CHECK_S)
            try:
                if await self._claim_epoch():
                    log.warning("Redis lost the rooms (restarted); writing this node's back")
                    await self._write_back(is_local)
                elif away:
                    log.info("Redis is reachable again")
                away = False
            except Unavailable:
                if not away:
                    log.warning("Redis is unreachable; room actions wait for it")
                away = True
            except Exception:
                # The watch must outlive any one failed write-back; the next round retries.
                log.exception("writing the rooms back to Redis failed")

    async def _write_back(self, is_local: Callable[[str], bool]) -> None:
        for consultation_id in self._mirror.rooms():
            async with self.lock(consultation_id):
                room = await self._mirror.get(consultation_id)
                if room is None:
                    continue
                mine = {pid: p for pid, p in room.participants.items() if is_local(p.connection)}
                await self._merge(replace(room, participants=mine))

    async def _merge(self, room: RoomState) -> None:
        """Like create, but adds to what other nodes have written back already."""
        await self._write(room, replace_all=False)

    async def _write(self, room: RoomState, *, replace_all: bool) -> None:
        keys = _keys(room.consultation_id)
        with _reachable():
            async with self._redis.pipeline(transaction=True) as pipe:
                if replace_all:
                    pipe.delete(*keys)
                pipe.hset(keys[0], mapping=_meta(room))
                for p in room.participants.values():
                    pipe.hset(keys[1], p.participant_id, json.dumps(p.to_dict()))
                if room.removed_users:
                    pipe.sadd(keys[2], *room.removed_users)
                for key in keys:
                    pipe.expire(key, _TTL_S)
                await pipe.execute()

    def lock(self, consultation_id: ConsultationId) -> _RoomLock:
        # Held across nodes for the few milliseconds one room action takes; polled every 5 ms
        # (redis-py's default 100 ms would add that much to every contended join).
        return _RoomLock(
            self._redis.lock(
                f"{_PREFIX}{consultation_id}:lock", timeout=10, blocking_timeout=10, sleep=0.005
            )
        )

    async def get(self, consultation_id: ConsultationId) -> RoomState | None:
        meta_key, people_key, removed_key = _keys(consultation_id)
        with _reachable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(meta_key)
                pipe.hgetall(people_key)
                pipe.smembers(removed_key)
                meta, people, removed = await pipe.execute()
        if not meta:
            # Not forgotten from the mirror: a restarted Redis looks the same until the
            # epoch watch has written the room back.
            return None
        participants = {
            ParticipantId(pid): LiveParticipant.from_dict(json.loads(raw))
            for pid, raw in people.items()
        }
        room = RoomState(
            consultation_id=consultation_id,
            session_id=SessionId(meta["session_id"]),
            participants=participants,
            removed_users={UserId(u) for u in removed},
            trainee_chat=meta.get("trainee_chat") == "1",
            recording=(
                RecordingOn.from_dict(json.loads(meta["recording"]))
                if meta.get("recording")
                else None
            ),
        )
        await self._mirror.create(room)
        return room

    async def create(self, room: RoomState) -> None:
        await self._write(room, replace_all=True)
        await self._mirror.create(room)

    async def put_participant(
        self, consultation_id: ConsultationId, participant: LiveParticipant
    ) -> None:
        _, people_key, _ = _keys(consultation_id)
        with _reachable():
            await self._redis.hset(
                people_key, participant.participant_id, json.dumps(participant.to_dict())
            )
            await self._redis.expire(people_key, _TTL_S)
        if await self._mirror.get(consultation_id) is not None:
            await self._mirror.put_participant(consultation_id, participant)

    async def drop_participant(
        self, consultation_id: ConsultationId, participant_id: ParticipantId
    ) -> None:
        with _reachable():
            await self._redis.hdel(_keys(consultation_id)[1], participant_id)
        await self._mirror.drop_participant(consultation_id, participant_id)

    async def mark_removed(self, consultation_id: ConsultationId, user_id: UserId) -> None:
        removed_key = _keys(consultation_id)[2]
        with _reachable():
            await self._redis.sadd(removed_key, user_id)
            await self._redis.expire(removed_key, _TTL_S)
        if await self._mirror.get(consultation_id) is not None:
            await self._mirror.mark_removed(consultation_id, user_id)

    async def set_trainee_chat(self, consultation_id: ConsultationId, open_: bool) -> None:
        meta_key = _keys(consultation_id)[0]
        # Only an existing room: a stray write must not leave a room without a session.
        with _reachable():
            if await self._redis.exists(meta_key):
                await self._redis.hset(meta_key, "trainee_chat", "1" if open_ else "0")
        if await self._mirror.get(consultation_id) is not None:
            await self._mirror.set_trainee_chat(consultation_id, open_)

    async def set_recording(
        self, consultation_id: ConsultationId, recording: RecordingOn | None
    ) -> None:
        meta_key = _keys(consultation_id)[0]
        with _reachable():
            if await self._redis.exists(meta_key):
                value = json.dumps(recording.to_dict()) if recording else ""
                await self._redis.hset(meta_key, "recording", value)
        if await self._mirror.get(consultation_id) is not None:
            await self._mirror.set_recording(consultation_id, recording)

    async def close(self, consultation_id: ConsultationId) -> None:
        with _reachable():
            await self._redis.delete(*_keys(consultation_id))
        await self._mirror.close(consultation_id)


class _RoomLock:
    """The Redis lock, with its failures told to the client as a refusal it can retry."""

    def __init__(self, lock: Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            with _reachable():
                acquired = await self._lock.acquire()
        except LockError:
            acquired = False
        if not acquired:
            raise RoomRefused("busy", "the room is busy; try again")

    async def __aexit__(self, *_: object) -> None:
        # A lock that expired while held (a stalled node) is not ours to release any more.
        with contextlib.suppress(LockError, Unavailable), _reachable():
            await self._lock.release()


def _keys(consultation_id: ConsultationId) -> tuple[str, str, str]:
    base = f"{_PREFIX}{consultation_id}"
    return f"{base}:meta", f"{base}:participants", f"{base}:removed"


def _meta(room: RoomState) -> dict[FieldT, EncodableT]:
    return {
        "session_id": room.session_id,
        "trainee_chat": "1" if room.trainee_chat else "0",
        "recording": json.dumps(room.recording.to_dict()) if room.recording else "",
    }


def _reachable() -> contextlib.AbstractContextManager[None]:
    return reachable("room presence")
