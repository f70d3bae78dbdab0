"""Which worker owns each live room, kept in Redis (the only coordination engine).

Every worker registers under an *incarnation* id (its node id and a token of this process's
life), renewed by a heartbeat: a key that expires when the worker stops renewing it. A room is
placed at its first join, atomically (one Lua script), on the less loaded of two workers drawn
at random among the live ones; the placement stands while its worker's key lives, and ends when
the room ends. A placement whose worker has died is replaced by the next join, and the worker
that gets it is told so (it takes the room over: rooms.room_service, signaling/routing.py).

A restarted worker comes back under a new incarnation, so its old rooms count as lost too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from media.hub import MediaHub
from rooms.errors import Unavailable
from rooms.model import ConsultationId
from server.redis_conn import REDIS_AWAY, client, reachable
from signaling.routing import Placed

log = logging.getLogger(__name__)

_WORKERS = "telemed:workers"  # sorted set: incarnation -> last heartbeat (ms)
_WORKER = "telemed:worker:"  # + incarnation: hash of its load, expires without heartbeats
_ROOMS_OF = "telemed:worker-rooms:"  # + incarnation: set of the rooms placed on it
_PLACED = "telemed:placement:"  # + consultation id: the owning incarnation

_LEASE = "telemed:takeover-lease:"  # + incarnation: who is cleaning up after it

HEARTBEAT_S = 1.0
# A worker silent this long is dead: three heartbeats missed.
WORKER_TTL_S = 3.0
# How long a dead worker stays listed (with its rooms) for another to clean up after it.
DEAD_KEPT_S = 3600

# KEYS: placement, worker key of candidate a, of b, rooms set of a, of b
# ARGV: incarnation a, incarnation b, worker prefix, rooms prefix
# Returns {owner, 1 if this call placed the room (it had no live owner), previous owner or ""}.
_PLACE = """
local owner = redis.call('GET', KEYS[1])
if owner and redis.call('EXISTS', ARGV[3] .. owner) == 1 then
  return {owner, 0, ''}
end
local best, best_rooms, best_cpu = nil, nil, nil
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[1 + i]) == 1 then
    local rooms = redis.call('SCARD', KEYS[3 + i])
    local cpu = tonumber(redis.call('HGET', KEYS[1 + i], 'cpu') or '0')
    if best == nil or rooms < best_rooms or (rooms == best_rooms and cpu < best_cpu) then
      best, best_rooms, best_cpu = ARGV[i], rooms, cpu
    end
  end
end
if best == nil then
  return {'', 0, owner or ''}
end
redis.call('SET', KEYS[1], best, 'PX', 86400000)
redis.call('SADD', ARGV[4] .. best, string.sub(KEYS[1], string.len(ARGV[5]) + 1))
if owner then
  redis.call('SREM', ARGV[4] .. owner, string.sub(KEYS[1], string.len(ARGV[5]) + 1))
end
return {best, 1, owner or ''}
"""

# KEYS: placement; ARGV: rooms prefix, consultation id
_RELEASE = """
local owner = redis.call('GET', KEYS[1])
if owner then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. owner, ARGV[2])
end
return 0
"""


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker carries, as its heartbeat reports it (and /metrics may show)."""

    rooms: int = 0
    tracks: int = 0
    frames_per_s: float = 0.0
    # This process's CPU time per wall-clock second since the last heartbeat (1.0 = one core).
    cpu: float = 0.0


class MediaLoad:
    """A worker's load as its media hub tells it (the heartbeat adds the CPU); `media` is read
    at each heartbeat, so the hub may come after this."""

    def __init__(self, media: Callable[[], MediaHub]) -> None:
        self._media = media
        self._mark = (time.monotonic(), 0)

    def __call__(self) -> WorkerLoad:
        totals = self._media().totals()
        now, forwarded = time.monotonic(), totals["frames_forwarded"]
        then, before = self._mark
        self._mark = (now, forwarded)
        rate = (forwarded - before) / (now - then) if now > then else 0.0
        return WorkerLoad(totals["rooms"], totals["publications"], round(rate, 1))


class RedisPlacement:
    def __init__(
        self,
        url: str,
        node_id: str,
        load: Callable[[], WorkerLoad],
        held: Callable[[], set[ConsultationId]] = set,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        ttl_s: float = WORKER_TTL_S,
    ) -> None:
        self.worker_id = f"{node_id}#{secrets.token_hex(4)}"
        self._redis: aioredis.Redis = client(url)
        self._load = load
        self._held = held
        self._registered = False
        self._heartbeat_s = heartbeat_s
        self._ttl_ms = int(ttl_s * 1000)
        self._place = self._redis.register_script(_PLACE)
        self._release = self._redis.register_script(_RELEASE)
        self._beat: asyncio.Task[None] | None = None
        self._cpu_mark = (time.monotonic(), time.process_time())

    async def start(self) -> None:
        """Registers this worker (before it serves: a room may be placed on it at once)."""
        with contextlib.suppress(*REDIS_AWAY):
            await self._heartbeat()
        self._beat = asyncio.create_task(self._beat_forever(), name="placement-heartbeat")

    async def stop(self) -> None:
        """Dead at once: rooms still placed here are placed again by their next join, and
        another worker cleans up after this one (dead_workers) as after a crash."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        with contextlib.suppress(*REDIS_AWAY):
            await self._redis.delete(_WORKER + self.worker_id)
        await self._redis.aclose()

    async def owner_of(self, consultation_id: ConsultationId) -> Placed:
        """The room's worker, placing the room first if it has no live one."""
        with reachable("room placement"):
            for _ in range(3):
                live = await self.live_workers()
                if self.worker_id not in live:
                    # Redis forgot us (restarted, say): register again, and give every other
                    # worker a heartbeat's time to place its rooms again before placing one
                    # that may be theirs.
                    await self._heartbeat()
                    await asyncio.sleep(self._heartbeat_s * 1.5)
                    live = await self.live_workers()
                a, b = random.sample(live, 2) if len(live) > 1 else (live[0], live[0])
                owner, fresh, previous = await self._place(
                    keys=[
                        _PLACED + consultation_id,
                        _WORKER + a,
                        _WORKER + b,
                        _ROOMS_OF + a,
                        _ROOMS_OF + b,
                    ],
                    args=[a, b, _WORKER, _ROOMS_OF, _PLACED],
                )
                if owner:
                    break
                # Both candidates died between the read and the script: draw again.
            else:
                raise Unavailable("no live worker to place the room on; try again")
        if fresh and previous:
            log.warning("room %s lost its worker %s: now on %s", consultation_id, previous, owner)
        return Placed(str(owner), bool(fresh), str(previous))

    async def release(self, consultation_id: ConsultationId) -> None:
        """The room's session ended (on whichever worker ended it): its placement ends."""
        with reachable("room placement"):
            await self._release(keys=[_PLACED + consultation_id], args=[_ROOMS_OF, consultation_id])

    async def live_workers(self) -> list[str]:
        with reachable("room placement"):
            since = int(time.time() * 1000) - self._ttl_ms
            return [str(w) for w in await self._redis.zrangebyscore(_WORKERS, since, "+inf")]

    async def alive(self, workers: set[str]) -> set[str]:
        """Those of `workers` whose heartbeat has not lapsed."""
        if not workers:
            return set()
        ordered = sorted(workers)
        with reachable("room placement"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker in ordered:
                    pipe.exists(_WORKER + worker)
                found = await pipe.execute()
        return {w for w, exists in zip(ordered, found, strict=True) if exists}

    async def dead_workers(self) -> list[str]:
        """Incarnations whose heartbeat lapsed and that nobody has cleaned up after yet."""
        with reachable("room placement"):
            listed = {str(w) for w in await self._redis.zrange(_WORKERS, 0, -1)}
        # Listed and without a live key: it stopped, or its heartbeat lapsed.
        return sorted(listed - await self.alive(listed))

    async def rooms_of(self, worker: str) -> set[ConsultationId]:
        """The rooms placed on `worker` (a dead one's, until it is forgotten)."""
        with reachable("room placement"):
            return {ConsultationId(str(c)) for c in await self._redis.smembers(_ROOMS_OF + worker)}

    async def lease(self, dead: str, ttl_s: float) -> bool:
        """Takes the lease on cleaning up after `dead`: True for exactly one worker at a time
        (until the lease expires, should that worker die too)."""
        with reachable("room placement"):
            taken = await self._redis.set(
                _LEASE + dead, self.worker_id, nx=True, px=int(ttl_s * 1000)
            )
        return bool(taken)

    async def forget(self, dead: str) -> None:
        """Cleaning up after `dead` is done: it leaves the registry for good."""
        with reachable("room placement"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(_WORKERS, dead)
                pipe.delete(_ROOMS_OF + dead, _WORKER + dead)
                await pipe.execute()

    async def load_of(self, worker: str) -> WorkerLoad | None:
        with reachable("room placement"):
            raw = await self._redis.hget(_WORKER + worker, "load")
        return None if raw is None else WorkerLoad(**json.loads(raw))

    async def _heartbeat(self) -> None:
        load = self._measured()
        now_ms = int(time.time() * 1000)
        key = _WORKER + self.worker_id
        if self._registered and not await self._redis.exists(key):
            await self._place_again()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"cpu": f"{load.cpu:.3f}", "load": json.dumps(asdict(load))})
            pipe.pexpire(key, self._ttl_ms)
            pipe.zadd(_WORKERS, {self.worker_id: now_ms})
            # Dead incarnations stay listed for a while, so that another worker takes over
            # what they left (see dead_workers), then leave.
            pipe.zremrangebyscore(_WORKERS, "-inf", now_ms - DEAD_KEPT_S * 1000)
            pipe.expire(_ROOMS_OF + self.worker_id, DEAD_KEPT_S)
            await pipe.execute()
        self._registered = True

    async def _place_again(self) -> None:
        """Redis forgot this worker (restarted, or our heartbeats stalled past the TTL): the
        rooms it still serves are placed on it again, unless a join placed one elsewhere
        meanwhile (that room then lives on two workers until its people reconnect)."""
        held = self._held()
        log.warning(
            "placement: Redis had forgotten this worker; placing its %d rooms again", len(held)
        )
        for consultation_id in held:
            if await self._redis.set(
                _PLACED + consultation_id, self.worker_id, nx=True, px=86_400_000
            ):
                await self._redis.sadd(_ROOMS_OF + self.worker_id, consultation_id)
            else:
                log.warning("placement: room %s was placed elsewhere meanwhile", consultation_id)

    def _measured(self) -> WorkerLoad:
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._cpu_mark
        self._cpu_mark = (wall, cpu)
        share = (cpu - last_cpu) / (wall - last_wall) if wall > last_wall else 0.0
        reported = self._load()
        return WorkerLoad(reported.rooms, reported.tracks, reported.frames_per_s, round(share, 3))

    async def _beat_forever(self) -> None:
        away = False
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self._heartbeat()
                if away:
                    log.info("placement: Redis is reachable again")
                away = False
            except REDIS_AWAY:
                if not away:
                    log.warning("placement: Redis is unreachable; this worker's heartbeat waits")
                away = True
