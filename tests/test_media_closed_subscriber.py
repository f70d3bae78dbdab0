"""A participant whose subscribe connection closed (its browser tore it down, its network
failed) must not stop the rest of the room from publishing and receiving."""

from __future__ import annotations

from media_client import MediaRoom
from media_peers import ColourCounterTrack, ToneTrack, close_to, mean_colour
from signaling_fixtures import eventually

from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}


async def test_a_closed_subscriber_does_not_break_publishing(media_room: MediaRoom) -> None:
    cid = (await media_room.server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    county = await media_room.seated(COUNTY, cid, label="county")
    specialist = await media_room.seated(SPECIALIST, cid, label="specialist")
    ack = await village.publish(
        [(ColourCounterTrack((220, 40, 40), **SIZE), "camera"), (ToneTrack(400.0), "microphone")]
    )
    assert ack == {"ok": True}, ack
    village_id = village.peer.participant_id
    await eventually(
        lambda: len(county.tracks_from(village_id, "video")) == 1, "county receives the village"
    )
    # The county physician's subscribe connection dies on the server's side.
    member = media_room.hub._rooms[cid][county.peer.participant_id]  # the hub exposes no member
    assert member.subscribe is not None
    await member.subscribe.pc.close()

    # The specialist still publishes, and the village doctor receives it.
    ack = await specialist.publish(
        [(ColourCounterTrack((40, 40, 220), **SIZE), "camera"), (ToneTrack(800.0), "microphone")]
    )
    assert ack == {"ok": True}, ack
    specialist_id = specialist.peer.participant_id
    await eventually(
        lambda: (
            len(village.tracks_from(specialist_id, "video")) == 1
            and len(village.tracks_from(specialist_id, "video")[0].frames) >= 10
        ),
        "the village doctor receives the specialist",
        within=20,
    )
    frames = village.tracks_from(specialist_id, "video")[0].frames
    assert close_to(mean_colour(frames[-1]), (40, 40, 220))  # type: ignore[arg-type]
