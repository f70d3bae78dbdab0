"""Redis killed under two nodes, and started again empty: meanwhile room actions are refused
with `unavailable` (never an internal error) and nothing is announced that is not recorded;
once it is back every node writes its own seats back, and the room carries on across both
nodes as before, to a proper end. The record is checked event by event."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from redis_fixtures import RestartableRedis
from test_multinode import RESIDENT, VILLAGE, Node, channel_subscribers, running_cluster

from rooms.model import ConsultationId, EventKind, SessionEvent
from server.app import PLACEMENT, STORE
from server.presence_redis import EPOCH_CHECK_S

pytest_plugins = ["redis_fixtures"]

# python-socketio's Redis manager replaces its client on reconnecting without closing the old
# one (AsyncRedisManager._redis_connect): the dead client's socket is reported when collected.
# Collected here, inside these tests, so that the report is not pinned on a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def collect_what_socketio_left() -> Iterator[None]:
    yield
    gc.collect()


# socket.io's Redis manager subscribes again after 1, 2, 4 ... s; the epoch watch within
# EPOCH_CHECK_S.
BACK_WITHIN_S = 30.0
# Loggers of this project (third-party libraries log their own retries as they see fit).
OURS = ("server", "signaling", "rooms", "media", "telemed")


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + BACK_WITHIN_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {BACK_WITHIN_S}s: {what}")
        await asyncio.sleep(EPOCH_CHECK_S)


async def events_of(node: Node, cid: ConsultationId) -> list[SessionEvent]:
    async with node.app[STORE].reading() as tx:
        return await tx.list_events(cid)


async def test_redis_restarted_under_two_nodes_the_room_carries_on(
    restartable_redis: RestartableRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_cluster(tmp_path, restartable_redis.url) as cluster:
        village, county, specialist, resident = await cluster.seat_everyone()
        everyone = (village, county, specialist, resident)
        cid = cluster.consultation_id
        await village.ok("chat", {"text": "before"})
        for peer in everyone:
            await peer.wait_for("chat_message", lambda d: d["text"] == "before")
        before = [(e.seq, e.kind, e.data) for e in await events_of(cluster.a, cid)]

        caplog.clear()
        restartable_redis.kill()
        # Both nodes refuse, and say why.
        for peer in (specialist, village):
            reply = await peer.call("chat", {"text": "while away"})
            assert reply.get("ok") is not True, reply
            assert reply["error"]["code"] == "unavailable", reply
        restartable_redis.start_again()

        # Each node notices the empty Redis and writes its own seats back, still connected.
        seated = {p.participant_id for p in everyone}

        async def seats_back() -> bool:
            room = await cluster.presence.get(cid)
            return room is not None and seated <= set(room.participants)

        await until(seats_back, "every seat back in Redis")

        # The placement too: the room is placed again on the worker that serves it.
        serving = [
            n for n in (cluster.a, cluster.b) if ConsultationId(cid) in n.namespace.rooms_served()
        ]
        assert len(serving) == 1, serving

        async def placed_back() -> bool:
            with restartable_redis.server.client() as plain:
                owner = plain.get(f"telemed:placement:{cid}")
            return owner is not None and owner.decode() == serving[0].app[PLACEMENT].worker_id

        await until(placed_back, "the room placed again on its worker")
        room = await cluster.presence.get(cid)
        assert room is not None
        assert all(room.participants[p].disconnected_at is None for p in seated)

        # Chat crosses both ways again, once socket.io's manager on each node has subscribed
        # anew (what either node relays before that, the other's peers miss).
        async def both_listen() -> bool:
            return await channel_subscribers(restartable_redis.url) >= 2

        await until(both_listen, "both nodes subscribed again")

        async def chat_from_b() -> bool:
            reply = await specialist.call("chat", {"text": "after"})
            return reply.get("ok") is True

        await until(chat_from_b, "a chat accepted on B")
        for peer in everyone:
            await peer.wait_for("chat_message", lambda d: d["text"] == "after")
        await village.ok("chat", {"text": "after, from A"})
        for peer in everyone:
            await peer.wait_for("chat_message", lambda d: d["text"] == "after, from A")
        # Moderation spans the nodes again: the specialist on B mutes the county physician.
        await specialist.ok("mute", {"participant": county.participant_id, "kind": "audio"})
        await county.wait_for("muted")

        await village.ok("end_session")
        for peer in everyone:
            ended = await peer.wait_for("session_ended")
            assert ended["reason"] == "ended"

        # The record: what was there before, unchanged; then exactly what was accepted.
        events = await events_of(cluster.b, cid)
        assert [(e.seq, e.kind, e.data) for e in events[: len(before)]] == before
        chats = [e.data["text"] for e in events if e.kind == EventKind.CHAT]
        assert chats == ["before", "after", "after, from A"], chats
        later = [e.kind for e in events[len(before) :]]
        assert later.count(EventKind.MUTED) == 1
        # Nobody left or joined because Redis was away: the seats were kept.
        assert EventKind.LEFT not in later and EventKind.JOINED not in later, later
        assert later[-1] == EventKind.SESSION_ENDED
        ours = [r for r in caplog.records if r.name.startswith(OURS)]
        assert not [r for r in ours if r.exc_info], [r.getMessage() for r in ours if r.exc_info]
        assert any("Redis lost the rooms" in r.getMessage() for r in ours)


async def test_an_invite_revoked_while_redis_is_away_ends_its_connection_once_back(
    restartable_redis: RestartableRedis, tmp_path: Path
) -> None:
    async with running_cluster(tmp_path, restartable_redis.url) as cluster:
        village, _, _, resident = await cluster.seat_everyone()  # the resident is on B
        jti = jwt.decode(cluster.tokens[RESIDENT], options={"verify_signature": False})["jti"]
        restartable_redis.kill()
        # Node A stores the revocation; it cannot tell B yet, and says so only in its log.
        url = f"{cluster.a.url}/api/v1/consultations/{cluster.consultation_id}/invites/{jti}"
        headers = {"Authorization": f"Bearer {cluster.tokens[VILLAGE]}"}
        async with aiohttp.ClientSession() as http, http.delete(url, headers=headers) as r:
            assert r.status == 204, await r.text()
        restartable_redis.start_again()
        # B subscribes again, finds the token on the deny list and ends its connection.
        await until(lambda: _true(resident.seen("token_revoked")), "the resident told")
        await resident.wait_gone()
        assert village.client.connected


async def _true(value: object) -> bool:
    return bool(value)
