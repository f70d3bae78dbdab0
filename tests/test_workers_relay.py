"""Two workers behind one Redis and one database, as `telemed serve --workers 2` runs them:
a consultation whose parties arrive at different workers is one room on one worker (its
placement), which every party sees and hears; the other worker relays their signaling.

Both workers are real aiohttp servers on 127.0.0.1 sharing an SQLite file and a private
redis-server; the parties are socket.io clients with real aiortc peer connections."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from media_client import MediaClient, media_config
from media_peers import ColourCounterTrack, ToneTrack, close_to, dominant_frequency, mean_colour
from signaling_fixtures import Peer, SignalingServer, eventually, start_signaling_server

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


async def test_a_teaching_room_whose_trainees_arrive_at_both_workers_reaches_each_of_them(
    workers: list[SignalingServer],
) -> None:
    """A room lives on one worker: trainees whose sockets reach the other worker are relayed
    there, and their media connections go to the room's worker."""
    a, b = workers
    cid = (await a.scheduled(kind=ConsultationKind.TEACHING)).id
    presenter = await a.seated(SPECIALIST, cid, label="presenter@A")
    camera = ColourCounterTrack((200, 80, 40), **SIZE)
    publisher = MediaClient(presenter)
    trainees: list[MediaClient] = []
    try:
        assert await publisher.publish([(camera, "camera"), (ToneTrack(440.0), "microphone")]) == {
            "ok": True
        }
        for n in range(6):
            server = (a, b)[n % 2]
            token, _ = await a.invite(cid, Role.TRAINEE, f"学员{n}")
            trainee = await server.connect(token, label=f"trainee-{n}@{'AB'[n % 2]}")
            client = MediaClient(trainee)
            trainees.append(client)
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
                ),
                f"{client.peer.label} receives the presenter's camera",
                within=30,
            )
            frames = client.tracks_from(pid, "video")[0].frames
            assert all(close_to(mean_colour(f), (200, 80, 40)) for f in frames[-3:])  # type: ignore[arg-type]
        owner = owner_of(workers, cid)
        assert len(owner.namespace.media.members(ConsultationId(cid))) == 7
        # Those who reached the other worker are relayed: it holds their sockets only (three
        # trainees, and the presenter if that is worker A).
        other = b if owner is a else a
        assert other.namespace.connection_count == (4 if other is a else 3)
        assert other.namespace.media.totals()["participants"] == 0
    finally:
        for client in [publisher, *trainees]:
            with contextlib.suppress(Exception):
                await client.close()
