"""Two server nodes behind one Redis and one database: a consultation whose participants are
split across the nodes must behave as if they were all on one.

Node A holds the village doctor and the county physician, node B the resident and the
provincial specialist (unless a test says otherwise). Both nodes are real aiohttp servers on
ephemeral 127.0.0.1 ports, sharing an SQLite file in tmp_path and a private redis-server
(redis_fixtures.py); the participants are real socket.io clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import socketio
from aiohttp import web

from rooms.live import ParticipantState
from rooms.model import ConsultationId, ConsultationStatus, ParticipantId
from rooms.roles import Role
from server.app import NAMESPACE, SERVICE, SIO, STORE, TOKENS, create_app
from server.config import Config, load_config
from server.demo import DEMO_RESIDENT, ensure_demo
from server.presence_redis import RedisPresence
from signaling.namespace import ConsultNamespace

pytest_plugins = ["redis_fixtures"]

NS = "/consult"
# Every wait in this module ends by this deadline; none needs more than a fraction of it.
TIMEOUT_S = 5.0
# The pub/sub channel socket.io's AsyncRedisManager uses by default.
SOCKETIO_CHANNEL = "socketio"

VILLAGE = Role.VILLAGE_DOCTOR
COUNTY = Role.COUNTY_PHYSICIAN
SPECIALIST = Role.PROVINCIAL_SPECIALIST
RESIDENT = Role.RESIDENT


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls `check` until it holds; fails after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT_S}s waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline


# --- nodes -----------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def sio(self) -> socketio.AsyncServer:
        return self.app[SIO]

    @property
    def namespace(self) -> ConsultNamespace:
        return self.app[NAMESPACE]

    async def idle(self) -> bool:
        """No socket.io connection left, and every disconnect handler has finished (the
        server forgets a connection's environ only after its handlers ran)."""
        return self.namespace.connection_count == 0 and not self.sio.environ


def node_config(tmp_path: Path, redis_url: str) -> Config:
    """Both nodes get the same config: one SQLite file under tmp_path, one Redis."""
    return load_config(
        env={},
        overrides={"dev": True, "data_dir": str(tmp_path), "redis_url": redis_url},
    )


async def start_node(name: str, config: Config) -> Node:
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return Node(name, app, runner, f"http://127.0.0.1:{port}")


async def stop_node(node: Node) -> None:
    await node.runner.cleanup()


async def channel_subscribers(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        counts = await client.pubsub_numsub(SOCKETIO_CHANNEL)
    finally:
        await client.aclose()
    return int(counts[0][1])


# --- participants ----------------------------------------------------------------------------


class Peer:
    """One socket.io client of the /consult namespace that records what it receives."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self.gone = asyncio.Event()
        self.participant_id = ParticipantId("")
        self._changed = asyncio.Event()
        self.client.on("*", self._on_event, namespace=NS)
        self.client.on("disconnect", self._on_disconnect, namespace=NS)

    async def _on_event(self, event: str, *args: Any) -> None:
        self.events.append((event, args[0] if len(args) == 1 else list(args)))
        self._changed.set()

    async def _on_disconnect(self, *_: Any) -> None:
        self.gone.set()
        self._changed.set()

    @property
    def sid(self) -> str:
        sid: str | None = self.client.get_sid(NS)
        assert sid is not None, f"{self.label} is not connected"
        return sid

    async def connect(self, node: Node, token: str) -> None:
        await self.client.connect(
            node.url,
            namespaces=[NS],
            auth={"token": token},
            transports=["websocket"],
            wait_timeout=TIMEOUT_S,
        )

    async def call(self, event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = await self.client.call(
            event, data or {}, namespace=NS, timeout=TIMEOUT_S
        )
        return reply

    async def ok(self, event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.call(event, data)
        assert reply.get("ok") is True, f"{self.label} {event}: {reply}"
        return reply

    def seen(self, event: str, match: Callable[[Any], bool] = lambda _: True) -> list[Any]:
        return [data for name, data in self.events if name == event and match(data)]

    async def wait_for(self, event: str, match: Callable[[Any], bool] = lambda _: True) -> Any:
        """The first `event` received (so far or from now on) whose payload matches."""
        try:
            async with asyncio.timeout(TIMEOUT_S):
                while True:
                    found = self.seen(event, match)
                    if found:
                        return found[0]
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            names = [name for name, _ in self.events]
            raise AssertionError(
                f"{self.label}: no matching {event!r} within {TIMEOUT_S}s; received {names}"
            ) from None

    async def wait_gone(self) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await self.gone.wait()
        except TimeoutError:
            raise AssertionError(f"{self.label} was not disconnected") from None
        assert not self.client.connected

    async def close(self) -> None:
        # Also when already disconnected: this releases the client's HTTP session.
        await self.client.disconnect()


def about(participant: ParticipantId) -> Callable[[Any], bool]:
    """Matches payloads that name `participant` (as `participant` or `participant_id`)."""

    def match(data: Any) -> bool:
        return isinstance(data, dict) and participant in (
            data.get("participant"),
            data.get("participant_id"),
        )

    return match


def about_waiting(participant: ParticipantId) -> Callable[[Any], bool]:
    """Matches `waiting` announcements for `participant`."""

    def match(data: Any) -> bool:
        return isinstance(data, dict) and data["participant"]["participant_id"] == participant

    return match


@dataclass
class Cluster:
    a: Node
    b: Node
    redis_url: str
    consultation_id: ConsultationId
    tokens: dict[Role, str]
    # A third view of the shared presence, for checking what the nodes wrote.
    presence: RedisPresence
    peers: list[Peer] = field(default_factory=list)

    async def connect(self, role: Role, node: Node, label: str = "") -> Peer:
        peer = Peer(label or f"{role.value}@{node.name}")
        self.peers.append(peer)
        await peer.connect(node, self.tokens[role])
        return peer

    async def enter(self, role: Role, node: Node, device: str = "default") -> Peer:
        """Connects and joins: clinicians are seated at once (their `joined` snapshot has
        arrived when this returns); the resident is left waiting (`waiting` has arrived)."""
        peer = await self.connect(role, node, f"{role.value}/{device}@{node.name}")
        await peer.ok("join", {"consultation_id": self.consultation_id, "device": device})
        if role is RESIDENT:
            waiting = await peer.wait_for("waiting")
            peer.participant_id = waiting["participant"]["participant_id"]
        else:
            joined = await peer.wait_for("joined")
            peer.participant_id = joined["you"]["participant_id"]
        return peer

    async def admit(self, admitter: Peer, waiting: Peer) -> dict[str, Any]:
        """`admitter` admits `waiting`; returns the `joined` snapshot `waiting` receives."""
        await admitter.wait_for("waiting", about_waiting(waiting.participant_id))
        await admitter.ok("admit", {"participant": waiting.participant_id})
        snapshot: dict[str, Any] = await waiting.wait_for("joined")
        return snapshot

    async def seat_everyone(self) -> tuple[Peer, Peer, Peer, Peer]:
        """The standard split: village doctor and county physician on A, specialist and the
        (admitted) resident on B. Returns them in that order."""
        village = await self.enter(VILLAGE, self.a)
        county = await self.enter(COUNTY, self.a)
        specialist = await self.enter(SPECIALIST, self.b)
        resident = await self.enter(RESIDENT, self.b)
        await self.admit(village, resident)
        for peer in (village, county, specialist):
            await peer.wait_for("participant_joined", about(resident.participant_id))
        return village, county, specialist, resident

    async def wait_linked(self) -> None:
        """socket.io's Redis manager subscribes at a node's start-up (server/app.py), in a
        task of its own: wait until both listen, then connect once to each node."""
        probes = [Peer(f"probe@{node.name}") for node in (self.a, self.b)]
        self.peers.extend(probes)

        async def linked() -> bool:
            return all(
                node.sio.manager.pubsub is not None and node.sio.manager.pubsub.subscribed
                for node in (self.a, self.b)
            )

        await eventually(linked, "both nodes to subscribe to the socket.io channel")
        for probe, node in zip(probes, (self.a, self.b), strict=True):
            await probe.connect(node, self.tokens[VILLAGE])
        for probe in probes:
            await probe.close()


@contextlib.asynccontextmanager
async def running_cluster(tmp_path: Path, redis_url: str) -> AsyncIterator[Cluster]:
    """Nodes A and B on one SQLite file and `redis_url`, linked, the demo consultation made;
    every peer closed and both nodes stopped afterwards."""
    config = node_config(tmp_path, redis_url)
    nodes: list[Node] = []
    presence = RedisPresence(redis_url)
    peers: list[Peer] = []
    try:
        # One after the other: the second node's start-up migration finds the schema at head.
        nodes.append(await start_node("A", config))
        nodes.append(await start_node("B", config))
        demo = await ensure_demo(nodes[0].app[SERVICE], nodes[0].app[TOKENS])
        cluster = Cluster(
            nodes[0],
            nodes[1],
            redis_url,
            demo.consultation.id,
            {who.role: token for who, token in demo.tokens},
            presence,
            peers,
        )
        await cluster.wait_linked()
        yield cluster
    finally:
        try:
            for peer in peers:
                await peer.close()
            for node in nodes:
                await eventually(node.idle, f"node {node.name} to finish its disconnects")
        finally:
            for node in reversed(nodes):
                await stop_node(node)
            await presence.stop()


@pytest.fixture
async def cluster(tmp_path: Path, redis_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, redis_url) as started:
        yield started


# --- tests -----------------------------------------------------------------------------------


async def test_presence_spans_nodes(cluster: Cluster) -> None:
    village = await cluster.enter(VILLAGE, cluster.a)
    county = await cluster.enter(COUNTY, cluster.a)
    specialist = await cluster.enter(SPECIALIST, cluster.b)

    # The snapshot B hands the specialist lists the two people seated on A.
    snapshot = await specialist.wait_for("joined")
    seated = {p["participant_id"]: p for p in snapshot["participants"]}
    assert set(seated) == {village.participant_id, county.participant_id, specialist.participant_id}
    assert seated[village.participant_id]["role"] == "village_doctor"
    assert seated[county.participant_id]["role"] == "county_physician"
    assert all(p["state"] == "admitted" and p["connected"] for p in seated.values())
    assert snapshot["consultation_id"] == cluster.consultation_id
    assert snapshot["you"]["participant_id"] == specialist.participant_id

    resident = await cluster.enter(RESIDENT, cluster.b)
    resident_snapshot = await cluster.admit(village, resident)
    assert {p["participant_id"] for p in resident_snapshot["participants"]} == {
        village.participant_id,
        county.participant_id,
        specialist.participant_id,
        resident.participant_id,
    }

    # Whoever was seated first hears of everyone seated after them, whichever node they are on.
    order = [village, county, specialist, resident]
    for i, earlier in enumerate(order):
        for later in order[i + 1 :]:
            joined = await earlier.wait_for("participant_joined", about(later.participant_id))
            assert joined["state"] == "admitted"
            assert joined["connected"] is True
        assert earlier.seen("participant_joined", about(earlier.participant_id)) == []

    # One presence for both nodes, holding each node's connection ids.
    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    assert room.session_id == snapshot["session_id"] == resident_snapshot["session_id"]
    for peer in order:
        found = room.by_connection(peer.sid)
        assert found is not None, peer.label
        assert found.participant_id == peer.participant_id
        assert found.state is ParticipantState.ADMITTED


async def test_waiting_room_spans_nodes(cluster: Cluster) -> None:
    village = await cluster.enter(VILLAGE, cluster.a)
    county = await cluster.enter(COUNTY, cluster.a)
    resident = await cluster.enter(RESIDENT, cluster.b)

    # Both admitters on A are told that the resident on B is waiting.
    for admitter in (village, county):
        waiting = await admitter.wait_for("waiting", about_waiting(resident.participant_id))
        assert waiting["participant"]["role"] == "resident"
        assert waiting["participant"]["state"] == "waiting"
    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    assert [p.participant_id for p in room.waiting()] == [resident.participant_id]

    # What is said while the resident waits must not reach them. Both chats leave node A in
    # this order, so had the first been sent to the resident it would have arrived first.
    await village.ok("chat", {"text": "before admission"})
    await village.ok("admit", {"participant": resident.participant_id})
    await village.ok("chat", {"text": "after admission"})

    snapshot = await resident.wait_for("joined")
    assert snapshot["you"]["participant_id"] == resident.participant_id
    assert snapshot["you"]["state"] == "admitted"
    assert {p["participant_id"] for p in snapshot["participants"]} == {
        village.participant_id,
        county.participant_id,
        resident.participant_id,
    }
    assert snapshot["waiting"] == []  # a resident does not run the waiting room
    await resident.wait_for("chat_message", lambda d: d["text"] == "after admission")
    assert [m["text"] for m in resident.seen("chat_message")] == ["after admission"]

    for admitter in (village, county):
        admitted = await admitter.wait_for("admitted", about(resident.participant_id))
        assert admitted["by"] == village.participant_id
        await admitter.wait_for("participant_joined", about(resident.participant_id))

    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    assert room.waiting() == []
    assert resident.participant_id in {p.participant_id for p in room.admitted()}


async def test_chat_crosses_nodes_both_ways(cluster: Cluster) -> None:
    village, county, specialist, resident = await cluster.seat_everyone()

    await resident.ok("chat", {"text": "胸闷好些了"})
    from_b = [
        await peer.wait_for("chat_message", lambda d: d["text"] == "胸闷好些了")
        for peer in (village, county, specialist, resident)
    ]
    assert from_b[0]["participant"] == resident.participant_id
    assert from_b[0]["role"] == "resident"
    assert all(m == from_b[0] for m in from_b), "every node relays the same recorded message"

    await village.ok("chat", {"text": "请继续吸氧"})
    from_a = [
        await peer.wait_for("chat_message", lambda d: d["text"] == "请继续吸氧")
        for peer in (specialist, resident, county, village)
    ]
    assert from_a[0]["participant"] == village.participant_id
    assert all(m == from_a[0] for m in from_a)
    assert from_a[0]["seq"] > from_b[0]["seq"]


async def test_annotations_and_pointer_cross_nodes(cluster: Cluster) -> None:
    village, county, specialist, resident = await cluster.seat_everyone()

    stroke = {
        "target_track": "cam-village",
        "points": [[0.1, 0.2], [0.3, 0.4]],
        "colour": "#FF0000",
        "width": 4.0,
    }
    await specialist.ok("annotate", stroke)
    for peer in (village, county, resident, specialist):
        got = await peer.wait_for("annotation", about(specialist.participant_id))
        assert got["points"] == [[0.1, 0.2], [0.3, 0.4]]
        assert got["colour"] == "#ff0000"
        assert got["width"] == 4.0
        assert got["clear"] is False
        assert got["target_track"] == "cam-village"

    # The pointer from A reaches B but not its sender; the clear sent after it arrives after it.
    await village.ok("pointer", {"target_track": "cam-village", "x": 0.5, "y": 0.25})
    await village.ok("annotate", {"target_track": "cam-village", "clear": True})
    for peer in (specialist, resident, county):
        pointer = await peer.wait_for("pointer", about(village.participant_id))
        assert (pointer["x"], pointer["y"]) == (0.5, 0.25)
    for peer in (specialist, resident, county, village):
        cleared = await peer.wait_for("annotation", about(village.participant_id))
        assert cleared["clear"] is True
        assert cleared["points"] == []
    assert village.seen("pointer") == []


async def test_mute_crosses_nodes(cluster: Cluster) -> None:
    village, county, specialist, resident = await cluster.seat_everyone()

    # The specialist on B mutes the county physician on A.
    await specialist.ok("mute", {"participant": county.participant_id, "kind": "audio"})
    for peer in (village, county, specialist, resident):
        muted = await peer.wait_for("muted", about(county.participant_id))
        assert muted == {
            "participant": county.participant_id,
            "kind": "audio",
            "by": specialist.participant_id,
        }

    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    muted_county = room.participants[county.participant_id]
    assert (muted_county.audio_muted, muted_county.video_muted) == (True, False)

    # The village doctor may not mute anyone (of the four, only the specialist may).
    reply = await village.call("mute", {"participant": resident.participant_id, "kind": "video"})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "forbidden"


async def test_remove_from_node_a_disconnects_the_participant_on_node_b(
    cluster: Cluster,
) -> None:
    # Here the specialist works on A, next to the village doctor; the resident and the
    # county physician are on B.
    village = await cluster.enter(VILLAGE, cluster.a)
    specialist = await cluster.enter(SPECIALIST, cluster.a)
    county = await cluster.enter(COUNTY, cluster.b)
    resident = await cluster.enter(RESIDENT, cluster.b)
    await cluster.admit(village, resident)
    await county.wait_for("participant_joined", about(resident.participant_id))

    await specialist.ok("remove", {"participant": resident.participant_id, "reason": "disruptive"})

    told = await resident.wait_for("removed")
    assert told == {
        "participant": resident.participant_id,
        "by": specialist.participant_id,
        "reason": "disruptive",
    }
    await resident.wait_gone()
    for peer in (village, specialist, county):
        removed = await peer.wait_for("removed", about(resident.participant_id))
        assert removed["by"] == specialist.participant_id
        left = await peer.wait_for("participant_left", about(resident.participant_id))
        assert left["reason"] == "kicked"

    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    assert resident.participant_id not in room.participants
    assert room.removed_users == {DEMO_RESIDENT}

    # Removed from the session on every node: back through B, the join is refused.
    again = await cluster.connect(RESIDENT, cluster.b, "resident-again@B")
    reply = await again.call("join", {"consultation_id": cluster.consultation_id})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "removed"


@pytest.mark.parametrize("resident_state", ["admitted", "waiting"])
async def test_end_session_on_node_a_ends_it_for_node_b(
    cluster: Cluster, resident_state: str
) -> None:
    village = await cluster.enter(VILLAGE, cluster.a)
    county = await cluster.enter(COUNTY, cluster.a)
    specialist = await cluster.enter(SPECIALIST, cluster.b)
    resident = await cluster.enter(RESIDENT, cluster.b)
    if resident_state == "admitted":
        await cluster.admit(village, resident)
    else:
        await village.wait_for("waiting")
    session_id = (await village.wait_for("joined"))["session_id"]

    await village.ok("end_session")

    for peer in (specialist, resident, county, village):
        ended = await peer.wait_for("session_ended")
        assert ended == {"session_id": session_id, "reason": "ended"}
        await peer.wait_gone()

    # The room is gone from the shared presence and the session from the shared record.
    assert await cluster.presence.get(cluster.consultation_id) is None
    assert await cluster.b.app[SERVICE].open_session(cluster.consultation_id) is None
    async with cluster.b.app[STORE].transaction() as tx:
        consultation = await tx.get_consultation(cluster.consultation_id)
    assert consultation is not None
    assert consultation.status is ConsultationStatus.OPINION_PENDING
    for node in (cluster.a, cluster.b):
        await eventually(node.idle, f"node {node.name} to drop every connection")


async def test_first_joins_racing_on_both_nodes_open_one_session(cluster: Cluster) -> None:
    village = await cluster.connect(VILLAGE, cluster.a)
    specialist = await cluster.connect(SPECIALIST, cluster.b)

    # Both open the scheduled consultation at once, each through its own node.
    join = {"consultation_id": cluster.consultation_id}
    replies = await asyncio.gather(village.call("join", join), specialist.call("join", join))

    assert list(replies) == [{"ok": True}, {"ok": True}]
    snapshots = [await peer.wait_for("joined") for peer in (village, specialist)]
    village.participant_id, specialist.participant_id = (
        snapshot["you"]["participant_id"] for snapshot in snapshots
    )
    assert snapshots[0]["session_id"] == snapshots[1]["session_id"]
    async with cluster.a.app[STORE].transaction() as tx:
        sessions = await tx.list_sessions(cluster.consultation_id)
    assert [s.id for s in sessions] == [snapshots[0]["session_id"]]

    # Whoever was seated second found the first in its snapshot; the first was told.
    for me, other, snapshot in (
        (village, specialist, snapshots[0]),
        (specialist, village, snapshots[1]),
    ):
        in_snapshot = other.participant_id in {
            p["participant_id"] for p in snapshot["participants"]
        }
        if not in_snapshot:
            await me.wait_for("participant_joined", about(other.participant_id))
    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    assert room.session_id == snapshots[0]["session_id"]
    assert {p.participant_id for p in room.admitted()} == {
        village.participant_id,
        specialist.participant_id,
    }


async def test_reconnect_through_the_other_node_keeps_the_seat(cluster: Cluster) -> None:
    village = await cluster.enter(VILLAGE, cluster.a)
    county = await cluster.enter(COUNTY, cluster.a)
    await cluster.enter(SPECIALIST, cluster.b)

    # The county physician's connection to A drops; the seat is kept for the grace period.
    await county.close()

    async def seat_kept() -> bool:
        room = await cluster.presence.get(cluster.consultation_id)
        seat = room.participants.get(county.participant_id) if room else None
        return seat is not None and seat.disconnected_at is not None

    await eventually(seat_kept, "node A to mark the county physician's seat disconnected")

    # Back within the grace period, through B: the same seat, at once (no waiting room).
    again = await cluster.enter(COUNTY, cluster.b)
    assert again.participant_id == county.participant_id
    snapshot = await again.wait_for("joined")
    assert snapshot["you"]["connected"] is True
    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    seat = room.participants[county.participant_id]
    assert (seat.connection, seat.disconnected_at) == (again.sid, None)

    # And B put the new connection in the room: A's chat reaches it.
    await village.ok("chat", {"text": "还在线吗"})
    await again.wait_for("chat_message", lambda d: d["text"] == "还在线吗")


async def test_same_device_on_another_node_replaces_the_old_connection(
    cluster: Cluster,
) -> None:
    """Whether the new connection keeps the seat or takes a new one is the service's choice;
    what must hold is one seat for that device, on the new connection, and the old one gone."""
    village = await cluster.enter(VILLAGE, cluster.a)
    county = await cluster.enter(COUNTY, cluster.a)
    await cluster.enter(SPECIALIST, cluster.b)

    # The village doctor's page is reloaded (the old connection not yet seen to drop) and the
    # new one lands on B.
    again = await cluster.enter(VILLAGE, cluster.b)

    await village.wait_gone()
    snapshot = await again.wait_for("joined")
    assert snapshot["you"]["connected"] is True
    room = await cluster.presence.get(cluster.consultation_id)
    assert room is not None
    seats = [p for p in room.participants.values() if p.role is VILLAGE]
    assert [(p.participant_id, p.connection, p.disconnected_at) for p in seats] == [
        (again.participant_id, again.sid, None)
    ]

    # The new connection is in the room (and among the admitters); the old one hears nothing.
    await county.ok("chat", {"text": "换了设备吗"})
    await again.wait_for("chat_message", lambda d: d["text"] == "换了设备吗")
    assert village.seen("chat_message") == []
    resident = await cluster.enter(RESIDENT, cluster.a)
    await again.wait_for("waiting", about_waiting(resident.participant_id))


async def test_app_cleanup_stops_the_socketio_redis_listener(
    tmp_path: Path, redis_url: str
) -> None:
    before = await channel_subscribers(redis_url)
    node = await start_node("solo", node_config(tmp_path, redis_url))
    demo = await ensure_demo(node.app[SERVICE], node.app[TOKENS])
    probe = Peer("probe@solo")
    try:
        await probe.connect(node, demo.tokens[0][1])

        async def subscribed() -> bool:
            return await channel_subscribers(redis_url) == before + 1

        await eventually(subscribed, "the node to subscribe")
    finally:
        await probe.close()
    await eventually(node.idle, "the probe's disconnect")
    await node.runner.cleanup()

    listener: asyncio.Task[None] = node.sio.manager.thread
    assert listener.done(), "the socket.io Redis listener outlives the app"
    assert await channel_subscribers(redis_url) == before
