"""Media in a live room, end to end: socket.io signaling, real aiortc peers on loopback, the
relay forwarding between them. Content is checked: colours, frame counters, tones."""

from __future__ import annotations

from typing import Any

import aiohttp
from media_client import MediaRoom
from media_peers import (
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    mean_colour,
    read_counter,
)
from signaling_fixtures import SignalingServer, eventually

from rooms.roles import Role
from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}


async def test_four_parties_each_receive_the_other_three(media_room: MediaRoom) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    county = await server.seated(COUNTY, cid, label="county")
    specialist = await server.seated(SPECIALIST, cid, label="specialist")

    looks = {
        "village": ((220, 40, 40), 300.0),
        "resident": ((40, 200, 40), 500.0),
        "county": ((40, 40, 220), 700.0),
        "specialist": ((220, 220, 40), 900.0),
    }
    # Every client listens for subscribe offers before anyone publishes, as a browser would.
    clients = {
        label: media_room.plain_client(peer)
        for label, peer in (
            ("village", village),
            ("resident", resident),
            ("county", county),
            ("specialist", specialist),
        )
    }
    for label, client in clients.items():
        colour, tone = looks[label]
        ack = await client.publish(
            [(ColourCounterTrack(colour, **SIZE), "camera"), (ToneTrack(tone), "microphone")]
        )
        assert ack == {"ok": True}, ack

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
                within=20,
            )
    for label, client in clients.items():
        for other, pid in pids.items():
            if other == label:
                continue
            colour, tone = looks[other]
            frames = client.tracks_from(pid, "video")[0].frames
            counters = [read_counter(f) for f in frames]  # type: ignore[arg-type]
            assert counters == sorted(counters), (label, other, counters)
            assert counters[-1] > counters[0]
            assert all(close_to(mean_colour(f), colour) for f in frames[-5:]), (label, other)  # type: ignore[arg-type]
            sound = client.tracks_from(pid, "audio")[0].frames[-40:]
            assert abs(dominant_frequency(sound) - tone) < 20, (label, other)  # type: ignore[arg-type]
    await check_statistics(server, cid, pids)

    # Every track was announced to the room with its source and owner.
    published = village.events("track_published")
    assert {(t["participant"], t["kind"], t["source"]) for t in published} >= {
        (pids["specialist"], "video", "camera"),
        (pids["specialist"], "audio", "microphone"),
    }


async def check_statistics(server: SignalingServer, cid: str, pids: dict[str, str]) -> None:
    """The room's media statistics over REST, and the node's counters at /metrics."""
    headers = {"Authorization": f"Bearer {server.token(VILLAGE)}"}
    async with aiohttp.ClientSession() as http:

        async def stats() -> dict[str, Any] | None:
            async with http.get(
                f"{server.url}/api/v1/consultations/{cid}/media", headers=headers
            ) as r:
                assert r.status == 200, await r.text()
                body: dict[str, Any] = await r.json()
            # Rates need two samples of the once-a-second sampler.
            video = [t for t in body["tracks"] if t["kind"] == "video"]
            moving = video and all(t["fps"] > 5 for t in video)
            return body if moving else None

        body = await eventually(stats, "video rates in the media statistics", within=10)
        assert len(body["tracks"]) == 8
        assert {t["participant"] for t in body["tracks"]} == set(pids.values())
        for track in body["tracks"]:
            assert len(track["subscribers"]) == 3
            assert {s["layer"] for s in track["subscribers"]} == {"full"}
            assert track["bitrate_bps"] > 0
        assert all(p["received_bps"] > 0 for p in body["participants"])
        async with http.get(f"{server.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert "telemed_media_publications 8.0" in text
        assert "telemed_media_subscriptions 24.0" in text
        assert "telemed_signaling_connections 4.0" in text
