"""Two workers behind one Redis and one database, as `telemed serve --workers 2` runs them:
a consultation whose parties arrive at different workers is one room on one worker (its
placement), which every party sees and hears; the other worker relays their signaling.

Both workers are real aiohttp servers on 127.0.0.1 sharing an SQLite file and a private
redis-server; the parties are socket.io clients with real aiortc peer connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lossy_link import Impairment, LossyLink
from lossy_media import LossySubscriber
from media_client import MediaClient, media_config
from media_peers import ColourCounterTrack, ToneTrack, close_to, dominant_frequency, mean_colour
from signaling_fixtures import Peer, SignalingServer, eventually, start_signaling_server

from media.pipe import KEYFRAME_EVERY_S
from rooms.model import ConsultationId, ConsultationKind
from rooms.roles import Role
from server.app import PLACEMENT
from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["redis_fixtures", "signaling_fixtures"]

SIZE = {"width": 160, "height": 120}


@pytest.fixture
async def workers(tmp_path: Path, redis_url: str) -> AsyncIterator[list[SignalingServer]]:
    started: list[SignalingServer] = []
    try:
        for name in ("w1", "w2"):
            config = media_config(tmp_path, redis_url=redis_url, node_id=f"host/{name}")
            started.append(await start_signaling_server(config))
        yield started
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                await server.close()


def owner_of(workers: list[SignalingServer], cid: str) -> SignalingServer:
    holding = [w for w in workers if w.namespace.media.members(ConsultationId(cid))]
    assert len(holding) == 1, [w.url for w in holding]
    return holding[0]


async def test_four_parties_on_two_workers_see_and_hear_each_other_through_the_owner(
    workers: list[SignalingServer],
) -> None:
    a, b = workers
    cid = (await a.scheduled()).id
    # The village doctor and the county physician reach worker A, the resident and the
    # specialist worker B.
    village = await a.seated(VILLAGE, cid, label="village@A")
    token, _ = await a.invite(cid, Role.RESIDENT)
    resident = await b.admitted(token, cid, village, label="resident@B")
    county = await a.seated(COUNTY, cid, label="county@A")
    specialist = await b.seated(SPECIALIST, cid, label="specialist@B")
    peers: dict[str, Peer] = {
        "village": village,
        "resident": resident,
        "county": county,
        "specialist": specialist,
    }
    looks = {
        "village": ((220, 40, 40), 300.0),
        "resident": ((40, 200, 40), 500.0),
        "county": ((40, 40, 220), 700.0),
        "specialist": ((220, 220, 40), 900.0),
    }
    clients = {label: MediaClient(peer) for label, peer in peers.items()}
    try:
        for label, client in clients.items():
            colour, tone = looks[label]
            ack = await client.publish(
                [(ColourCounterTrack(colour, **SIZE), "camera"), (ToneTrack(tone), "microphone")]
            )
            assert ack == {"ok": True}, (label, ack)
        pids = {label: c.peer.participant_id for label, c in clients.items()}
        for label, client in clients.items():
            for other, pid in pids.items():
                if other == label:
                    continue
                await eventually(
                    lambda c=client, p=pid: (
                        len(c.tracks_from(p, "video")) == 1
                        and len(c.tracks_from(p, "video")[0].frames) >= 20
                        and len(c.tracks_from(p, "audio")) == 1
                        and len(c.tracks_from(p, "audio")[0].frames) >= 40
                    ),
                    f"{label} receives {other}'s video and audio",
                    within=30,
                )
                colour, tone = looks[other]
                frames = client.tracks_from(pid, "video")[0].frames
                assert all(close_to(mean_colour(f), colour) for f in frames[-5:]), (label, other)  # type: ignore[arg-type]
                sound = client.tracks_from(pid, "audio")[0].frames[-40:]
                assert abs(dominant_frequency(sound) - tone) < 20, (label, other)  # type: ignore[arg-type]
        # One room, on one worker: every seat and every track is there, none on the other.
        owner = owner_of(workers, cid)
        other = b if owner is a else a
        assert len(owner.namespace.media.members(ConsultationId(cid))) == 4
        assert len(owner.namespace.media.tracks(ConsultationId(cid))) == 8
        assert other.namespace.media.totals()["rooms"] == 0
        assert owner.namespace.rooms_served() == {ConsultationId(cid)}
        assert other.namespace.rooms_served() == set()

        # Each heartbeat reports the worker's media load (what placement compares).
        async def owner_reports_its_room() -> bool:
            placement = owner.app[PLACEMENT]
            load = await placement.load_of(placement.worker_id)
            return (
                load is not None and (load.rooms, load.tracks) == (1, 8) and load.frames_per_s > 0
            )

        await eventually(owner_reports_its_room, "the owner's heartbeat to report its room")

        # Chat from a relayed party reaches everyone, and the record has it once.
        relayed = specialist if other is b else village
        await relayed.ok("chat", {"text": "经中继"})
        for peer in peers.values():
            await peer.wait_for("chat_message", lambda d: d["text"] == "经中继")
        chats = [e for e in await a.events(cid) if e.kind.value == "chat"]
        assert [e.data["text"] for e in chats] == ["经中继"]

        # A relayed party that leaves takes its tracks from everyone.
        await resident.ok("leave")
        await clients["resident"].close()
        await eventually(
            lambda: len(owner.namespace.media.members(ConsultationId(cid))) == 3,
            "the resident's seat and tracks gone from the owner",
        )
        for label in ("village", "county", "specialist"):
            await peers[label].wait_for(
                "track_unpublished", lambda d: d["participant"] == pids["resident"]
            )

        # The end reaches every party on both workers, and the placement ends with the room.
        await village.ok("end_session")
        for label in ("village", "county", "specialist"):
            ended = await peers[label].wait_for("session_ended")
            assert ended["reason"] == "ended"
            await peers[label].wait_disconnected()
        await eventually(
            lambda: owner.namespace.media.totals()["rooms"] == 0, "the owner's media room closed"
        )
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.close()


def edge_rooms(server: SignalingServer) -> dict[str, Any]:
    edges = server.namespace._edge_media
    assert edges is not None
    return edges._rooms


def owner_pipes(server: SignalingServer) -> dict[tuple[str, str], Any]:
    edges = server.namespace._edge_media
    assert edges is not None
    return edges._out


async def test_a_teaching_room_spans_two_workers_its_trainees_served_where_they_arrived(
    workers: list[SignalingServer],
) -> None:
    """Trainees whose sockets reach the worker that does not own the room get their media
    from that worker (an edge), from tracks the owner pipes to it once; their signaling is
    still relayed to the owner, their media events answered by the edge."""
    a, b = workers
    cid = (await a.scheduled(kind=ConsultationKind.TEACHING)).id
    room = ConsultationId(cid)
    presenter = await a.seated(SPECIALIST, cid, label="presenter")
    placed = await a.app[PLACEMENT].owner_of(room)
    owner = next(w for w in workers if w.app[PLACEMENT].worker_id == placed.owner)
    edge = b if owner is a else a
    camera = ColourCounterTrack((200, 80, 40), **SIZE)
    publisher = MediaClient(presenter)
    trainees: list[MediaClient] = []
    at_edge: list[MediaClient] = []
    loop = asyncio.get_running_loop()
    try:
        assert await publisher.publish([(camera, "camera"), (ToneTrack(440.0), "microphone")]) == {
            "ok": True
        }
        # Before the first trainee: the edge's pipe opens after this.
        started = loop.time()
        for n in range(6):
            server = (owner, edge)[n % 2]
            token, _ = await a.invite(cid, Role.TRAINEE, f"学员{n}")
            trainee = await server.connect(token, label=f"trainee-{n}@{'OE'[n % 2]}")
            client = MediaClient(trainee)
            trainees.append(client)
            if server is edge:
                at_edge.append(client)
            await trainee.join(cid)
            waiting = await trainee.wait_for("waiting")
            await presenter.ok("admit", {"participant": waiting["participant"]["participant_id"]})
            await trainee.wait_for("joined")
        pid = presenter.participant_id
        for client in trainees:
            await eventually(
                lambda c=client: (
                    len(c.tracks_from(pid, "video")) == 1
                    and len(c.tracks_from(pid, "video")[0].frames) >= 10
                    and len(c.tracks_from(pid, "audio")) == 1
                    and len(c.tracks_from(pid, "audio")[0].frames) >= 40
                ),
                f"{client.peer.label} receives the presenter's camera and microphone",
                within=30,
            )
            frames = client.tracks_from(pid, "video")[0].frames
            assert all(close_to(mean_colour(f), (200, 80, 40)) for f in frames[-3:])  # type: ignore[arg-type]
            sound = client.tracks_from(pid, "audio")[0].frames[-40:]
            assert abs(dominant_frequency(sound) - 440.0) < 20  # type: ignore[arg-type]
        # The owner serves the presenter and the trainees that reached it; the edge serves
        # its own three from one pipe of the room's two tracks.
        assert len(owner.namespace.media.members(room)) == 4
        assert set(edge.namespace.media.members(room)) == {
            pid,
            *(c.peer.participant_id for c in at_edge),
        }
        served = edge_rooms(edge)[room]
        assert len(served.ssrcs) == 2 and served.owner == placed.owner
        assert list(owner_pipes(owner)) == [(room, edge.app[PLACEMENT].worker_id)]
        edge_stats = await edge.namespace.media.stats(room)
        for track in edge_stats["tracks"]:
            assert {s["participant"] for s in track["subscribers"]} == {
                c.peer.participant_id for c in at_edge
            }
            assert all(s["frames"] > 0 for s in track["subscribers"])
        # Three trainees subscribing at the edge asked for a keyframe: it reached the
        # presenter at most once a second (plus the one asked at once).
        elapsed = loop.time() - started
        assert 1 <= served.pipe.requests_sent <= elapsed / KEYFRAME_EVERY_S + 1

        # A media event of an edge's seat is answered by the edge.
        edge_trainee = at_edge[0].peer
        ack = await edge_trainee.call("set_layer", {"layer": "low"})
        assert ack == {"ok": True, "result": {"tracks": 1}}
        # Its other events are still the owner's: chat reaches everyone, once in the record.
        await presenter.ok("set_trainee_chat", {"open": True})
        await edge_trainee.ok("chat", {"text": "经边缘"})
        for client in trainees:
            await client.peer.wait_for("chat_message", lambda d: d["text"] == "经边缘")
        chats = [e for e in await a.events(cid) if e.kind.value == "chat"]
        assert [e.data["text"] for e in chats] == ["经边缘"]

        # A track published later is piped too, and reaches the edge's trainees.
        screen = ColourCounterTrack((40, 90, 210), **SIZE)
        assert await publisher.publish([(screen, "screen")]) == {"ok": True}
        for client in at_edge:
            await eventually(
                lambda c=client: (
                    len(c.tracks_from(pid, "video")) == 2
                    and all(len(t.frames) >= 5 for t in c.tracks_from(pid, "video"))
                ),
                f"{client.peer.label} receives the presenter's screen",
                within=30,
            )
        assert len(served.ssrcs) == 3

        # The edge's trainees leave: the last takes the pipe with it, on both sides.
        for client in at_edge:
            await client.peer.ok("leave")
        await eventually(lambda: not owner_pipes(owner), "the owner's pipe to the edge closed")
        await eventually(lambda: not edge_rooms(edge), "the edge's room closed")
        assert edge.namespace.media.totals()["rooms"] == 0
        # The others carry on.
        here = trainees[0].tracks_from(pid, "video")[0]
        count = len(here.frames)
        await eventually(
            lambda: len(here.frames) > count + 10, "the owner's trainees still receive"
        )
    finally:
        for client in [publisher, *trainees]:
            with contextlib.suppress(Exception):
                await client.close()


async def heartbeat_stops(server: SignalingServer) -> None:
    """To the other workers, `server` is dead: its heartbeat stops and lapses at once. It
    goes on running, as a worker cut off from the others would."""
    placement = server.app[PLACEMENT]
    assert placement._beat is not None
    placement._beat.cancel()
    await placement._redis.delete(f"telemed:worker:{placement.worker_id}")


async def teaching_room_on_both(
    workers: list[SignalingServer],
) -> tuple[str, SignalingServer, SignalingServer, MediaClient, list[MediaClient]]:
    """A presenter publishing, and two trainees on each worker receiving: (room, owner,
    edge, presenter, trainees at the edge)."""
    a, _ = workers
    cid = (await a.scheduled(kind=ConsultationKind.TEACHING)).id
    presenter = await a.seated(SPECIALIST, cid, label="presenter")
    placed = await a.app[PLACEMENT].owner_of(ConsultationId(cid))
    owner = next(w for w in workers if w.app[PLACEMENT].worker_id == placed.owner)
    edge = next(w for w in workers if w is not owner)
    publisher = MediaClient(presenter)
    assert await publisher.publish([(ColourCounterTrack((90, 200, 90), **SIZE), "camera")]) == {
        "ok": True
    }
    at_edge = []
    for n in range(4):
        token, _ = await a.invite(cid, Role.TRAINEE, f"学员{n}")
        server = (owner, edge)[n % 2]
        trainee = await server.connect(token, label=f"trainee-{n}")
        client = MediaClient(trainee)
        await trainee.join(cid)
        waiting = await trainee.wait_for("waiting")
        await presenter.ok("admit", {"participant": waiting["participant"]["participant_id"]})
        await trainee.wait_for("joined")
        await eventually(
            lambda c=client: any(len(t.frames) >= 5 for t in c.received.values()),
            f"trainee {n} receives the presenter",
            within=30,
        )
        if server is edge:
            at_edge.append(client)
    return cid, owner, edge, publisher, at_edge


async def test_an_edge_whose_room_worker_died_ends_its_media_and_drops_its_trainees(
    workers: list[SignalingServer],
) -> None:
    cid, owner, edge, publisher, at_edge = await teaching_room_on_both(workers)
    try:
        assert ConsultationId(cid) in edge_rooms(edge)
        await heartbeat_stops(owner)
        # The edge closes the sockets relayed to the dead worker (the clients reconnect and
        # are placed again) and ends the room's media it served.
        for client in at_edge:
            await client.peer.wait_disconnected(within=30)
        await eventually(lambda: not edge_rooms(edge), "the edge's room closed", within=30)
        assert edge.namespace.media.totals()["rooms"] == 0
    finally:
        for client in [publisher, *at_edge]:
            with contextlib.suppress(Exception):
                await client.close()


async def test_a_room_worker_whose_edge_died_stops_piping_to_it(
    workers: list[SignalingServer],
) -> None:
    cid, owner, edge, publisher, at_edge = await teaching_room_on_both(workers)
    try:
        room = ConsultationId(cid)
        assert list(owner_pipes(owner)) == [(room, edge.app[PLACEMENT].worker_id)]
        await heartbeat_stops(edge)
        await eventually(lambda: not owner_pipes(owner), "the pipe to the dead edge", within=30)
        # The trainees' seats wait for them as any dropped seat does; the room goes on.
        assert len(owner.namespace.media.members(room)) == 3
    finally:
        for client in [publisher, *at_edge]:
            with contextlib.suppress(Exception):
                await client.close()


async def test_a_trainee_on_a_lossy_link_at_the_edge_is_repaired_by_the_edge(
    workers: list[SignalingServer],
) -> None:
    """The edge packetizes and sends itself: the NACKs of its trainee on a lossy downlink are
    answered from the edge's own send history; nothing crosses back to the room's worker
    but keyframe requests (none here beyond the first ones), and the pipe loses nothing."""
    a, _ = workers
    cid = (await a.scheduled(kind=ConsultationKind.TEACHING)).id
    room = ConsultationId(cid)
    presenter = await a.seated(SPECIALIST, cid, label="presenter")
    placed = await a.app[PLACEMENT].owner_of(room)
    owner = next(w for w in workers if w.app[PLACEMENT].worker_id == placed.owner)
    edge = next(w for w in workers if w is not owner)
    publisher = MediaClient(presenter)
    link = LossyLink(Impairment(), Impairment(loss=0.05), seed=3)
    await link.open()
    trainee: LossySubscriber | None = None
    try:
        camera = ColourCounterTrack((200, 80, 40), **SIZE)
        assert await publisher.publish([(camera, "camera")]) == {"ok": True}
        token, _ = await a.invite(cid, Role.TRAINEE, "远端学员")
        trainee = LossySubscriber(await edge.connect(token, label="trainee@edge"), link)
        await trainee.peer.join(cid)
        waiting = await trainee.peer.wait_for("waiting")
        await presenter.ok("admit", {"participant": waiting["participant"]["participant_id"]})
        await trainee.peer.wait_for("joined")
        pid = presenter.participant_id
        await eventually(
            lambda: trainee is not None and len(trainee.offered_from(pid, "video")) == 1,
            "the trainee offered the camera",
        )
        (video_id,) = trainee.offered_from(pid, "video")

        def repaired_at_edge() -> int:
            hops = [
                h
                for h in edge.namespace.media.hops()
                if h.direction == "subscriber" and h.track.track_id == video_id
            ]
            return int(hops[0].counts["retransmitted"] or 0) if hops else 0

        await eventually(
            lambda: repaired_at_edge() >= 10, "retransmissions from the edge", within=60
        )
        frames = trainee.frames_of(video_id)
        await eventually(
            lambda: trainee.frames_of(video_id) > frames + 60, "video goes on", within=60
        )
        served = edge_rooms(edge)[room]
        (ssrc,) = served.ssrcs.values()
        assert served.pipe.frames_lost(ssrc) == 0
        # The owner forwards the camera to nobody but the pipe: no subscriber of its own.
        assert owner.namespace.media.hops() == [
            h for h in owner.namespace.media.hops() if h.direction == "intake"
        ]
    finally:
        for client in (publisher, trainee):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        link.close()
