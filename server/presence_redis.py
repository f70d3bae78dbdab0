"""Room presence in Redis, so every server node sees the same rooms (see rooms/live.py for
the in-memory twin). Nothing here is durable: the record lives in the database."""

from __future__ import annotations

import contextlib
import json

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from rooms.errors import RoomRefused
from rooms.live import LiveParticipant, RecordingOn, RoomState
from rooms.model import ConsultationId, ParticipantId, SessionId, UserId

_PREFIX = "telemed:room:"
# A room's keys expire if a node dies mid-session and nobody closes the room.
_TTL_S = 24 * 3600


class RedisPresence:
    def __init__(self, url: str, max_connections: int = 50) -> None:
        # A blocking pool: under a burst of joins, callers wait for a connection in turn
        # instead of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, decode_responses=True
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)

    async def stop(self) -> None:
        # The pool was handed in, so closing the client alone would leave its sockets open.
        await self._redis.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        await self._redis.ping()

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
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.hgetall(people_key)
            pipe.smembers(removed_key)
            meta, people, removed = await pipe.execute()
        if not meta:
            return None
        participants = {
            ParticipantId(pid): LiveParticipant.from_dict(json.loads(raw))
            for pid, raw in people.items()
        }
        return RoomState(
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

    async def create(self, room: RoomState) -> None:
        keys = _keys(room.consultation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.hset(
                keys[0],
                mapping={
                    "session_id": room.session_id,
                    "trainee_chat": "1" if room.trainee_chat else "0",
                    "recording": json.dumps(room.recording.to_dict()) if room.recording else "",
                },
            )
            for p in room.participants.values():
                pipe.hset(keys[1], p.participant_id, json.dumps(p.to_dict()))
            if room.removed_users:
                pipe.sadd(keys[2], *room.removed_users)
            for key in keys:
                pipe.expire(key, _TTL_S)
            await pipe.execute()

    async def put_participant(
        self, consultation_id: ConsultationId, participant: LiveParticipant
    ) -> None:
        _, people_key, _ = _keys(consultation_id)
        await self._redis.hset(
            people_key, participant.participant_id, json.dumps(participant.to_dict())
        )
        await self._redis.expire(people_key, _TTL_S)

    async def drop_participant(
        self, consultation_id: ConsultationId, participant_id: ParticipantId
    ) -> None:
        await self._redis.hdel(_keys(consultation_id)[1], participant_id)

    async def mark_removed(self, consultation_id: ConsultationId, user_id: UserId) -> None:
        removed_key = _keys(consultation_id)[2]
        await self._redis.sadd(removed_key, user_id)
        await self._redis.expire(removed_key, _TTL_S)

    async def set_trainee_chat(self, consultation_id: ConsultationId, open_: bool) -> None:
        meta_key = _keys(consultation_id)[0]
        # Only an existing room: a stray write must not leave a room without a session.
        if await self._redis.exists(meta_key):
            await self._redis.hset(meta_key, "trainee_chat", "1" if open_ else "0")

    async def set_recording(
        self, consultation_id: ConsultationId, recording: RecordingOn | None
    ) -> None:
        meta_key = _keys(consultation_id)[0]
        if await self._redis.exists(meta_key):
            value = json.dumps(recording.to_dict()) if recording else ""
            await self._redis.hset(meta_key, "recording", value)

    async def close(self, consultation_id: ConsultationId) -> None:
        await self._redis.delete(*_keys(consultation_id))


class _RoomLock:
    """The Redis lock, with its failures told to the client as a refusal it can retry."""

    def __init__(self, lock: Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            acquired = await self._lock.acquire()
        except LockError:
            acquired = False
        if not acquired:
            raise RoomRefused("busy", "the room is busy; try again")

    async def __aexit__(self, *_: object) -> None:
        # A lock that expired while held (a stalled node) is not ours to release any more.
        with contextlib.suppress(LockError):
            await self._lock.release()


def _keys(consultation_id: ConsultationId) -> tuple[str, str, str]:
    base = f"{_PREFIX}{consultation_id}"
    return f"{base}:meta", f"{base}:participants", f"{base}:removed"
