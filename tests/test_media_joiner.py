"""A participant who joins a room where two others already publish: the server's first
subscribe offer to it carries two video and two audio sections at once, and every one of them
must flow (checked by colour, frame counter and tone)."""

from __future__ import annotations

from media_client import MediaRoom, TrackingMediaClient
from media_peers import (
    Collector,
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    mean_colour,
    read_counter,
)
from signaling_fixtures import eventually

from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]


def received(client: TrackingMediaClient, participant: str, kind: str) -> Collector | None:
    ids = client.offered_from(participant, kind)
    return client.collector(ids[0]) if len(ids) == 1 else None


async def test_a_joiner_receives_both_publishers_from_its_first_offer(
    media_room: MediaRoom,
) -> None:
    cid = (await media_room.server.scheduled()).id
    looks = {"county": ((220, 40, 40), 400.0), "specialist": ((40, 40, 220), 800.0)}
    publishers = {
        "county": await media_room.seated(COUNTY, cid, label="county"),
        "specialist": await media_room.seated(SPECIALIST, cid, label="specialist"),
    }
    for label, client in publishers.items():
        colour, tone = looks[label]
        ack = await client.publish(
            [(ColourCounterTrack(colour, 160, 120), "camera"), (ToneTrack(tone), "microphone")]
        )
        assert ack == {"ok": True}, ack
    county_pid = publishers["county"].peer.participant_id
    await eventually(
        lambda: publishers["specialist"].offered_from(county_pid, "video"),
        "the specialist's offer of the county's tracks",
    )

    joiner = await media_room.seated(VILLAGE, cid, label="joiner")
    await eventually(lambda: joiner.answered_at, "the joiner's first answer accepted")
    first_offer = joiner.offers[0]
    assert sorted(i["kind"] for i in first_offer.values()) == ["audio", "audio", "video", "video"]

    for label, client in publishers.items():
        pid = client.peer.participant_id

        def flowing(p: str = pid) -> bool:
            video = received(joiner, p, "video")
            audio = received(joiner, p, "audio")
            return (
                video is not None
                and len(video.frames) >= 20
                and audio is not None
                and len(audio.frames) >= 40
            )

        await eventually(flowing, f"the joiner receives {label}'s video and audio", within=20)
        colour, tone = looks[label]
        video = received(joiner, pid, "video")
        audio = received(joiner, pid, "audio")
        assert video is not None and audio is not None
        counters = [read_counter(f) for f in video.frames]  # type: ignore[arg-type]
        assert counters == sorted(counters), (label, counters)
        assert counters[-1] > counters[0], (label, counters)
        assert all(close_to(mean_colour(f), colour) for f in video.frames[-5:]), label  # type: ignore[arg-type]
        assert abs(dominant_frequency(audio.frames[-40:]) - tone) < 20, label  # type: ignore[arg-type]
    # Nothing went through a renegotiation to get there: the first offer carried it all.
    assert len(joiner.offers) == 1, joiner.offers
