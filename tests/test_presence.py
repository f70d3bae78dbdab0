"""The PresenceStore contract, run against both stores: InMemoryPresence (one process) and
RedisPresence (shared by server nodes, against a private redis-server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis

from rooms.live import InMemoryPresence, LiveParticipant, ParticipantState, PresenceStore, RoomState
from rooms.model import ConsultationId, ParticipantId, SessionId, UserId
from rooms.roles import Role
from server.presence_redis import RedisPresence

pytest_plugins = ["redis_fixtures"]

STORES = ("memory", "redis")
CID = ConsultationId("c_presence_1")
OTHER_CID = ConsultationId("c_presence_2")
T0 = datetime(2025, 3, 1, 1, 0, 0, 123456, tzinfo=UTC)
# A non-UTC offset, to check that a round trip keeps it.
BEIJING = timezone(timedelta(hours=8))
# Generous bound for anything that must not hang (the Redis lock polls every 0.1 s).
DEADLINE_S = 15.0


def participant(n: int, **changes: Any) -> LiveParticipant:
    base = LiveParticipant(
        participant_id=ParticipantId(f"p_{n:04d}"),
        user_id=UserId(f"user-{n}"),
        name=f"王村医{n}",
        role=Role.VILLAGE_DOCTOR,
        org="莲花村卫生室",
        device="default",
        connection=f"sid-{n}",
        state=ParticipantState.ADMITTED,
        joined_at=T0 + timedelta(seconds=n),
    )
    return replace(base, **changes)


def room(cid: ConsultationId = CID, session: str = "s_1", **changes: Any) -> RoomState:
    return RoomState(cid, SessionId(session), **changes)


def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.node.callspec.params["presence"]
    return kind


@pytest.fixture(params=STORES)
async def presence(request: pytest.FixtureRequest) -> AsyncIterator[PresenceStore]:
    if request.param == "memory":
        yield InMemoryPresence()
        return
    store = RedisPresence(request.getfixturevalue("redis_url"))
    try:
        yield store
    finally:
        await store.stop()


@pytest.fixture
async def redis_presence(redis_url: str) -> AsyncIterator[RedisPresence]:
    store = RedisPresence(redis_url)
    try:
        yield store
    finally:
        await store.stop()


# --- reading and writing ---------------------------------------------------------------------


async def test_get_of_an_unknown_room_is_none(presence: PresenceStore) -> None:
    assert await presence.get(ConsultationId("c_never_created")) is None


async def test_create_then_get_round_trips_participants_and_trainee_chat(
    presence: PresenceStore,
) -> None:
    admitted = participant(1, hand_raised=True, audio_muted=True)
    waiting = participant(
        2,
        role=Role.RESIDENT,
        state=ParticipantState.WAITING,
        video_muted=True,
        joined_at=datetime(2025, 3, 1, 9, 0, 5, 7, tzinfo=BEIJING),
        disconnected_at=datetime(2025, 3, 1, 9, 0, 9, 1, tzinfo=BEIJING),
    )
    created = room(
        participants={admitted.participant_id: admitted, waiting.participant_id: waiting},
        trainee_chat=True,
    )

    await presence.create(created)
    got = await presence.get(CID)

    assert got is not None
    assert got.consultation_id == CID
    assert got.session_id == "s_1"
    assert got.trainee_chat is True
    assert got.participants == {"p_0001": admitted, "p_0002": waiting}
    assert got.removed_users == set()
    assert got.participants[ParticipantId("p_0002")].joined_at.utcoffset() == timedelta(hours=8)
    assert [p.participant_id for p in got.admitted()] == ["p_0001"]
    assert [p.participant_id for p in got.waiting()] == ["p_0002"]


async def test_create_of_an_empty_room_round_trips(presence: PresenceStore) -> None:
    await presence.create(room())
    assert await presence.get(CID) == room()


async def test_create_keeps_removed_users(presence: PresenceStore) -> None:
    await presence.create(room(removed_users={UserId("user-7"), UserId("user-8")}))
    got = await presence.get(CID)
    assert got is not None
    assert got.removed_users == {"user-7", "user-8"}


async def test_get_returns_a_snapshot_not_the_stored_room(presence: PresenceStore) -> None:
    await presence.create(room(participants={ParticipantId("p_0001"): participant(1)}))
    first = await presence.get(CID)
    assert first is not None
    first.participants.pop(ParticipantId("p_0001"))
    first.removed_users.add(UserId("user-9"))
    first.trainee_chat = True

    again = await presence.get(CID)
    assert again is not None
    assert list(again.participants) == ["p_0001"]
    assert again.removed_users == set()
    assert again.trainee_chat is False


async def test_create_does_not_keep_a_reference_to_the_callers_room(
    presence: PresenceStore,
) -> None:
    mine = room()
    await presence.create(mine)
    mine.participants[ParticipantId("p_0001")] = participant(1)
    mine.removed_users.add(UserId("user-1"))
    mine.trainee_chat = True

    assert await presence.get(CID) == room()


async def test_create_replaces_the_previous_session(presence: PresenceStore) -> None:
    await presence.create(room(session="s_1", trainee_chat=True))
    await presence.put_participant(CID, participant(1))
    await presence.mark_removed(CID, UserId("user-2"))

    await presence.create(room(session="s_2"))

    assert await presence.get(CID) == room(session="s_2")


async def test_put_participant_adds_and_replaces(presence: PresenceStore) -> None:
    await presence.create(room())
    first = participant(1)
    second = participant(2, state=ParticipantState.WAITING)
    await presence.put_participant(CID, first)
    await presence.put_participant(CID, second)

    updated = replace(first, hand_raised=True, connection="sid-1-again", disconnected_at=T0)
    await presence.put_participant(CID, updated)

    got = await presence.get(CID)
    assert got is not None
    assert got.participants == {"p_0001": updated, "p_0002": second}
    assert got.by_connection("sid-1-again") == updated
    assert got.by_connection("sid-1") is None
    assert got.by_device(UserId("user-2"), "default") == second


async def test_drop_participant(presence: PresenceStore) -> None:
    await presence.create(
        room(participants={ParticipantId(f"p_000{n}"): participant(n) for n in (1, 2)})
    )

    await presence.drop_participant(CID, ParticipantId("p_0001"))
    # Dropping someone not there, or in a room that does not exist, is not an error.
    await presence.drop_participant(CID, ParticipantId("p_0001"))
    await presence.drop_participant(ConsultationId("c_never_created"), ParticipantId("p_0001"))

    got = await presence.get(CID)
    assert got is not None
    assert list(got.participants) == ["p_0002"]
    assert await presence.get(ConsultationId("c_never_created")) is None


async def test_mark_removed_accumulates_and_is_idempotent(presence: PresenceStore) -> None:
    await presence.create(room())

    await presence.mark_removed(CID, UserId("user-1"))
    await presence.mark_removed(CID, UserId("user-2"))
    await presence.mark_removed(CID, UserId("user-1"))

    got = await presence.get(CID)
    assert got is not None
    assert got.removed_users == {"user-1", "user-2"}


async def test_set_trainee_chat_opens_and_closes(presence: PresenceStore) -> None:
    await presence.create(room(participants={ParticipantId("p_0001"): participant(1)}))

    await presence.set_trainee_chat(CID, True)
    opened = await presence.get(CID)
    await presence.set_trainee_chat(CID, False)
    closed = await presence.get(CID)

    assert opened is not None and opened.trainee_chat is True
    assert closed is not None and closed.trainee_chat is False
    # Only the flag changed.
    assert closed == room(participants={ParticipantId("p_0001"): participant(1)})


async def test_close_forgets_the_room_and_only_that_room(presence: PresenceStore) -> None:
    await presence.create(room(CID, participants={ParticipantId("p_0001"): participant(1)}))
    await presence.mark_removed(CID, UserId("user-5"))
    await presence.create(room(OTHER_CID, session="s_other"))
    await presence.put_participant(OTHER_CID, participant(2))

    await presence.close(CID)
    await presence.close(CID)  # closing twice is harmless
    await presence.close(ConsultationId("c_never_created"))

    assert await presence.get(CID) is None
    other = await presence.get(OTHER_CID)
    assert other is not None
    assert other.session_id == "s_other"
    assert list(other.participants) == ["p_0002"]

    # A room created again after close starts empty (nothing of the old one survives).
    await presence.create(room(CID, session="s_new"))
    assert await presence.get(CID) == room(CID, session="s_new")


# --- the lock --------------------------------------------------------------------------------


async def test_lock_serialises_two_critical_sections(presence: PresenceStore) -> None:
    counter = 0
    inside = 0
    most_inside = 0
    first_holds = asyncio.Event()
    second_waits = asyncio.Event()

    async def increment(after: asyncio.Event | None, signal: asyncio.Event) -> None:
        nonlocal counter, inside, most_inside
        if after is not None:
            await after.wait()
            signal.set()
        async with presence.lock(CID):
            inside += 1
            most_inside = max(most_inside, inside)
            if after is None:
                signal.set()
            value = counter
            # Yield while holding the lock: the other task gets every chance to run.
            await (second_waits.wait() if after is None else asyncio.sleep(0))
            await asyncio.sleep(0)
            counter = value + 1
            inside -= 1

    await asyncio.wait_for(
        asyncio.gather(increment(None, first_holds), increment(first_holds, second_waits)),
        DEADLINE_S,
    )

    assert counter == 2
    assert most_inside == 1


async def test_lock_is_per_room(presence: PresenceStore) -> None:
    # Another room's lock is free while this one is held.
    async with presence.lock(CID), asyncio.timeout(DEADLINE_S), presence.lock(OTHER_CID):
        pass


async def test_lock_is_released_when_the_critical_section_fails(presence: PresenceStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with presence.lock(CID):
            raise RuntimeError("boom")
    async with asyncio.timeout(DEADLINE_S), presence.lock(CID):
        pass


# --- the participant's wire form -------------------------------------------------------------


@pytest.mark.parametrize(
    "disconnected_at",
    [None, datetime(2025, 3, 1, 9, 30, 0, 42, tzinfo=BEIJING)],
    ids=["connected", "disconnected"],
)
def test_live_participant_dict_round_trip(disconnected_at: datetime | None) -> None:
    original = participant(
        3,
        role=Role.PROVINCIAL_SPECIALIST,
        state=ParticipantState.WAITING,
        hand_raised=True,
        video_muted=True,
        disconnected_at=disconnected_at,
    )

    data = original.to_dict()
    # The dict is what RedisPresence stores: it must survive JSON.
    restored = LiveParticipant.from_dict(json.loads(json.dumps(data)))

    assert restored == original
    assert data["disconnected_at"] == (disconnected_at.isoformat() if disconnected_at else None)
    assert data["joined_at"] == original.joined_at.isoformat()
    assert data["role"] == "provincial_specialist"
    assert data["state"] == "waiting"
    assert restored.public()["connected"] is (disconnected_at is None)


# --- Redis only ------------------------------------------------------------------------------


async def test_redis_keys_carry_a_ttl(redis_presence: RedisPresence, redis_url: str) -> None:
    await redis_presence.create(
        room(participants={ParticipantId("p_0001"): participant(1)}, trainee_chat=True)
    )
    await redis_presence.put_participant(CID, participant(2))
    await redis_presence.mark_removed(CID, UserId("user-3"))
    await redis_presence.set_trainee_chat(CID, False)

    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted([k async for k in raw.scan_iter(match=f"*{CID}*")])
        ttls = {key: await raw.ttl(key) for key in keys}
    finally:
        await raw.aclose()

    assert len(keys) == 3, keys  # meta, participants, removed
    for key, ttl in ttls.items():
        assert 0 < ttl <= 24 * 3600, (key, ttl)


async def test_redis_presence_is_shared_between_instances(redis_url: str) -> None:
    node_a, node_b = RedisPresence(redis_url), RedisPresence(redis_url)
    try:
        await node_a.create(room())
        await node_a.put_participant(CID, participant(1))
        await node_b.put_participant(CID, participant(2))
        await node_b.mark_removed(CID, UserId("user-9"))

        seen_by_a = await node_a.get(CID)
        seen_by_b = await node_b.get(CID)
        assert seen_by_a is not None
        assert seen_by_a == seen_by_b
        assert sorted(seen_by_a.participants) == ["p_0001", "p_0002"]
        assert seen_by_a.removed_users == {"user-9"}

        await node_b.close(CID)
        assert await node_a.get(CID) is None
    finally:
        await node_a.stop()
        await node_b.stop()


async def test_redis_lock_spans_instances(redis_url: str) -> None:
    """Two nodes (two clients of the same Redis) serialise on one room's lock."""
    node_a, node_b = RedisPresence(redis_url), RedisPresence(redis_url)
    order: list[str] = []
    a_holds, b_tries = asyncio.Event(), asyncio.Event()
    try:

        async def on_a() -> None:
            async with node_a.lock(CID):
                a_holds.set()
                order.append("a in")
                await b_tries.wait()
                # Round trips to Redis after B's first attempt went out: a lock that did not
                # span instances would let B in meanwhile.
                for _ in range(3):
                    await node_a.ping()
                order.append("a out")

        async def on_b() -> None:
            await a_holds.wait()
            order.append("b tries")
            b_tries.set()
            async with node_b.lock(CID):
                order.append("b in")

        await asyncio.wait_for(asyncio.gather(on_a(), on_b()), DEADLINE_S)
    finally:
        await node_a.stop()
        await node_b.stop()

    assert order == ["a in", "b tries", "a out", "b in"]
