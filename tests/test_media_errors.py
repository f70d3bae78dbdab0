"""Media requests that must be refused, with the right code, without hurting the room: a
broken offer, a request from someone not (yet) in the room, an answer nobody asked for, a
source the role may not publish, a token used outside its consultation. After each refusal
the others' chat and media go on."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import socketio
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from media_client import MediaRoom, TrackingMediaClient
from media_peers import ColourCounterTrack, ToneTrack, close_to, local_description, mean_colour
from signaling_fixtures import eventually

from rooms.roles import Role
from server.demo import COUNTY, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
COUNTY_COLOUR = (40, 60, 220)
VILLAGE_COLOUR = (200, 60, 60)


@dataclass
class Live:
    """A room where the county physician's camera reaches the village doctor."""

    cid: str
    village: TrackingMediaClient
    county: TrackingMediaClient
    county_video: str


async def live_room(room: MediaRoom) -> Live:
    cid = (await room.server.scheduled()).id
    village = await room.seated(VILLAGE, cid, label="village")
    county = await room.seated(COUNTY, cid, label="county")
    ack = await county.publish([(ColourCounterTrack(COUNTY_COLOUR, **SIZE), "camera")])
    assert ack == {"ok": True}, ack
    county_pid = county.peer.participant_id
    await eventually(lambda: village.offered_from(county_pid, "video"), "village's offer")
    (video,) = village.offered_from(county_pid, "video")
    await eventually(lambda: village.frames_of(video) >= 10, "village sees the county")
    return Live(cid, village, county, video)


async def still_works(live: Live, text: str) -> None:
    """Chat still reaches the room, and the county's picture still advances at the village."""
    await live.county.peer.ok("chat", {"text": text})
    await live.village.peer.wait_for("chat_message", lambda m: m["text"] == text)
    seen = live.village.frames_of(live.county_video)
    await eventually(
        lambda: live.village.frames_of(live.county_video) >= seen + 15,
        "the county's picture keeps arriving",
    )
    got = live.village.collector(live.county_video)
    assert got is not None and close_to(mean_colour(got.frames[-1]), COUNTY_COLOUR)  # type: ignore[arg-type]


async def county_sees_the_village(live: Live) -> None:
    """The county physician is offered the village doctor's camera and sees its colour."""
    village_pid = live.village.peer.participant_id
    await eventually(lambda: live.county.offered_from(village_pid, "video"), "county's offer")
    (video,) = live.county.offered_from(village_pid, "video")
    await eventually(lambda: live.county.frames_of(video) >= 10, "county sees the village")
    got = live.county.collector(video)
    assert got is not None and close_to(mean_colour(got.frames[-1]), VILLAGE_COLOUR)  # type: ignore[arg-type]


async def client_offer(codecs: list[str] | None = None) -> str:
    """The SDP of a real aiortc client offer of one camera (video codecs in the given order,
    by MIME type, else aiortc's default: VP8 first), from a connection closed again."""
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver(ColourCounterTrack(VILLAGE_COLOUR, **SIZE), "sendonly")
        if codecs is not None:
            available = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences(
                [c for mime in codecs for c in available if c.mimeType == mime]
            )
        return await local_description(pc, offer=True)
    finally:
        await pc.close()


async def raw_offer(sources: list[str]) -> tuple[str, dict[str, str]]:
    """The SDP of a client offer with one track per source (audio for `microphone`), and the
    `tracks` map of publish_offer, from a connection closed again."""
    pc = RTCPeerConnection()
    try:
        for source in sources:
            track = (
                ToneTrack(500.0)
                if source == "microphone"
                else ColourCounterTrack(VILLAGE_COLOUR, **SIZE)
            )
            pc.addTransceiver(track, "sendonly")
        sdp = await local_description(pc, offer=True)
        mids = [t.mid or "" for t in pc.getTransceivers()]
        return sdp, dict(zip(mids, sources, strict=True))
    finally:
        await pc.close()


def first_codec(sdp: str, kind: str) -> str:
    """The MIME subtype of the first payload type of the first `kind` section."""
    lines = sdp.split("\r\n")
    m_line = next(line for line in lines if line.startswith(f"m={kind} "))
    payload_type = m_line.split()[3]
    rtpmap = next(line for line in lines if line.startswith(f"a=rtpmap:{payload_type} "))
    return rtpmap.split()[1].split("/")[0]


async def test_a_malformed_offer_is_a_media_error_and_the_room_goes_on(
    media_room: MediaRoom,
) -> None:
    live = await live_room(media_room)
    peer = live.village.peer
    good = await client_offer()
    lines = good.split("\r\n")
    broken = {
        "cut in half": good[: len(good) // 2],
        "without ICE password": "\r\n".join(x for x in lines if not x.startswith("a=ice-pwd")),
        "a garbled candidate": good.replace("a=candidate:", "a=candidate:garbled "),
        "a garbled m-line": good.replace("m=video ", "m=video port "),
        "a section without credentials": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n",
    }
    for what, sdp in broken.items():
        error = await peer.refused("publish_offer", {"sdp": sdp, "tracks": {"0": "camera"}})
        assert error["code"] == "media_error", (what, error)
    # A payload of the wrong shape is refused before anything looks at it.
    for payload in (
        {"sdp": 42},
        {"sdp": ""},
        {"sdp": ["v=0"]},
        {"sdp": good, "tracks": {"0": "hologram"}},
        {"sdp": good, "tracks": ["camera"]},
        {"tracks": {"0": "camera"}},
        {"sdp": good, "colour": "red"},
        {"sdp": good + "a=x" * 20_000},  # over the 60,000 characters an SDP may have
    ):
        error = await peer.refused("publish_offer", payload)
        assert error["code"] == "invalid_payload", (payload, error)
    assert peer.events("publish_answer") == []
    assert all(
        t["participant"] != peer.participant_id for t in live.county.peer.events("track_published")
    )
    await still_works(live, "after the broken offers")

    # The same participant can still publish a proper offer afterwards, and is seen.
    ack = await live.village.publish([(ColourCounterTrack(VILLAGE_COLOUR, **SIZE), "camera")])
    assert ack == {"ok": True}, ack
    await county_sees_the_village(live)


async def test_text_that_is_not_sdp_is_a_media_error(media_room: MediaRoom) -> None:
    live = await live_room(media_room)
    for sdp in ("this is not SDP", "v=0", "v=0\r\n\x00\x01\x02"):
        ack = await live.village.peer.call("publish_offer", {"sdp": sdp, "tracks": {"0": "camera"}})
        assert ack.get("error", {}).get("code") == "media_error", (sdp, ack)
    assert live.village.peer.events("publish_answer") == []


async def test_an_offer_without_vp8_is_a_media_error(media_room: MediaRoom) -> None:
    live = await live_room(media_room)
    sdp = await client_offer(["video/H264", "video/rtx"])
    assert "VP8" not in sdp
    ack = await live.village.peer.call("publish_offer", {"sdp": sdp, "tracks": {"0": "camera"}})
    assert ack.get("error", {}).get("code") == "media_error", ack
    village_pid = live.village.peer.participant_id
    published = live.county.peer.events("track_published")
    assert [t for t in published if t["participant"] == village_pid] == []
    await still_works(live, "after the H.264 offer")


async def test_an_offer_preferring_h264_is_answered_with_vp8(media_room: MediaRoom) -> None:
    live = await live_room(media_room)
    publisher = live.village
    publisher.publisher.addTransceiver(ColourCounterTrack(VILLAGE_COLOUR, **SIZE), "sendonly")
    available = RTCRtpSender.getCapabilities("video").codecs
    publisher.publisher.getTransceivers()[0].setCodecPreferences(
        [
            c
            for mime in ("video/H264", "video/VP8", "video/rtx")
            for c in available
            if c.mimeType == mime
        ]
    )
    offer = await local_description(publisher.publisher, offer=True)
    assert first_codec(offer, "video") == "H264"
    await publisher.peer.ok("publish_offer", {"sdp": offer, "tracks": {"0": "camera"}})
    answer = (await publisher.peer.wait_for("publish_answer"))["sdp"]
    assert first_codec(answer, "video") == "VP8", answer
    await publisher.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await county_sees_the_village(live)


async def test_media_before_admission_is_not_in_room(media_room: MediaRoom) -> None:
    live = await live_room(media_room)
    token, _ = await media_room.server.invite(live.cid, Role.RESIDENT)
    resident, _pid = await media_room.waiting(token, live.cid, label="resident")
    refusal = await resident.publish([(ToneTrack(500.0), "microphone")])
    assert refusal["ok"] is False and refusal["error"]["code"] == "not_in_room", refusal
    error = await resident.peer.refused("subscribe_answer", {"sdp": "v=0"})
    assert error["code"] == "not_in_room", error
    # Waiting, they were offered nothing, and nobody was told of a track.
    assert resident.offers == []
    county_pid = live.county.peer.participant_id
    assert all(t["participant"] == county_pid for t in live.village.peer.events("track_published"))
    await still_works(live, "after the waiting resident's attempts")


async def test_a_subscribe_answer_without_an_offer_is_a_media_error(media_room: MediaRoom) -> None:
    cid = (await media_room.server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    # Nothing is published: no offer was ever made.
    error = await village.peer.refused("subscribe_answer", {"sdp": "v=0"})
    assert error["code"] == "media_error", error

    live_county = await media_room.seated(COUNTY, cid, label="county")
    ack = await live_county.publish([(ColourCounterTrack(COUNTY_COLOUR, **SIZE), "camera")])
    assert ack == {"ok": True}, ack
    county_pid = live_county.peer.participant_id
    await eventually(
        lambda: village.offered_from(county_pid, "video") and village.settled(),
        "the village doctor answered the offer",
    )
    # The offer is answered: a second answer has no offer waiting.
    answer = village.subscriber.localDescription.sdp
    error = await village.peer.refused("subscribe_answer", {"sdp": answer})
    assert error["code"] == "media_error", error
    # And the answered connection still carries the picture.
    (video,) = village.offered_from(county_pid, "video")
    seen = village.frames_of(video)
    await eventually(lambda: village.frames_of(video) >= seen + 15, "the picture goes on")


async def test_a_source_the_role_may_not_publish_is_forbidden(media_room: MediaRoom) -> None:
    live = await live_room(media_room)
    token, _ = await media_room.server.invite(live.cid, Role.RESIDENT)
    resident = await media_room.admitted(token, live.cid, live.village.peer, label="resident")
    resident_pid = resident.peer.participant_id
    # A screen with a camera and a microphone: the whole offer is refused, not just the screen.
    sdp, sources = await raw_offer(["camera", "microphone", "screen"])
    error = await resident.peer.refused("publish_offer", {"sdp": sdp, "tracks": sources})
    assert error["code"] == "forbidden", error
    assert "publish_screen" in error["message"], error
    # And a screen alone.
    refusal = await resident.publish([(ColourCounterTrack((1, 2, 3), **SIZE), "screen")])
    assert refusal["ok"] is False and refusal["error"]["code"] == "forbidden", refusal
    await resident.peer.ok("chat", {"text": "能看到我吗"})
    await live.village.peer.wait_for("chat_message", lambda m: m["text"] == "能看到我吗")
    assert all(
        t["participant"] != resident_pid for t in live.village.peer.events("track_published")
    )
    assert all(t.participant != resident_pid for t in media_room.hub.tracks(live.cid))
    assert resident.peer.events("publish_answer") == []
    await still_works(live, "after the refused screen")


async def test_a_scoped_token_reaches_only_its_consultation(media_room: MediaRoom) -> None:
    server = media_room.server
    a = (await server.scheduled()).id
    b = (await server.scheduled()).id
    village_b = await media_room.seated(VILLAGE, b, label="village-b")
    token_a, _ = await server.invite(a, Role.RESIDENT)

    # Asking for B with A's invite is refused at connect.
    outsider = server.peer("resident-a-to-b")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await outsider.connect({"token": token_a, "consultation_id": b})
    assert outsider.connect_errors == [{"message": "token is scoped to another consultation"}]

    # Connected (to A, or without naming one), it may not join B...
    for auth in ({}, {"consultation_id": a}):
        resident = media_room.client(await server.connect(token_a, label="resident-a", auth=auth))
        error = await resident.peer.refused("join", {"consultation_id": b, "device": "phone"})
        assert error["code"] == "forbidden", error
        assert "scoped to another consultation" in error["message"]
        # ...and media events apply to the joined room only: having joined none, there is none.
        refusal = await resident.publish([(ToneTrack(500.0), "microphone")])
        assert refusal["ok"] is False and refusal["error"]["code"] == "not_in_room", refusal
        error = await resident.peer.refused("subscribe_answer", {"sdp": "v=0"})
        assert error["code"] == "not_in_room", error
    assert media_room.hub.members(b) == [village_b.peer.participant_id]
    assert media_room.hub.tracks(b) == []
    assert village_b.peer.events("waiting") == []
