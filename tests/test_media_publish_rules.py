"""What a publish offer may publish, with real aiortc offers: every section that sends media
must be named in `tracks`, with a source of its kind that the publisher may publish, within
the caps on sections per offer and tracks per participant; otherwise the whole offer is refused
and nothing is published, announced or forwarded. The allowed cases still publish, and what
arrives is the picture and the tone that were sent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from hypothesis import given, settings
from hypothesis import strategies as st
from media_client import MediaRoom, TrackingMediaClient, client_peer_connection, media_config
from media_peers import (
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    local_description,
    mean_colour,
)
from signaling_fixtures import eventually

from media.errors import MediaError
from media.offer_sections import offered_sections
from rooms.model import ConsultationKind
from rooms.roles import Role
from server.config import ConfigError
from server.demo import COORDINATOR, COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
# The codes a publish offer can be refused with for breaking a publishing rule.
RULE_CODES = (
    "unnamed_section",
    "unknown_section",
    "source_mismatch",
    "too_many_sections",
    "too_many_tracks",
)


class Offerer:
    """A client's publish connection driven by hand: each transceiver remembers the source it
    is sent as, and each offer carries whatever `tracks` map the test chooses."""

    def __init__(self, client: TrackingMediaClient) -> None:
        self.client = client
        self.sources: dict[RTCRtpTransceiver, str] = {}

    def add(self, track: MediaStreamTrack, source: str) -> None:
        self.sources[self.client.publisher.addTransceiver(track, direction="sendonly")] = source

    def add_receive_only(self, kind: str) -> None:
        self.client.publisher.addTransceiver(kind, direction="recvonly")

    async def sdp(self) -> str:
        return await local_description(self.client.publisher, offer=True)

    def named(self) -> dict[str, str]:
        """Every sending transceiver by mid, as the web client names them."""
        return {t.mid: s for t, s in self.sources.items() if t.mid is not None}

    async def send(self, sdp: str, tracks: dict[str, str]) -> dict[str, Any]:
        """publish_offer; an accepted offer's answer is applied. Returns the ack."""
        peer = self.client.peer
        before = len(peer.events("publish_answer"))
        ack: dict[str, Any] = await peer.call("publish_offer", {"sdp": sdp, "tracks": tracks})
        if ack.get("ok"):
            await peer.wait_for("publish_answer")
            answer = peer.events("publish_answer")[before]["sdp"]
            await self.client.publisher.setRemoteDescription(
                RTCSessionDescription(answer, "answer")
            )
        return ack

    async def refused(self, sdp: str, tracks: dict[str, str], code: str) -> dict[str, Any]:
        error = await self.client.peer.refused("publish_offer", {"sdp": sdp, "tracks": tracks})
        assert error["code"] == code, (tracks, error)
        return error


def publish_connection_made(room: MediaRoom, cid: str, participant: str) -> bool:
    """Whether the relay made a publish connection for the participant: only an offer that
    passed every rule reaches aiortc."""
    member = room.hub._rooms[cid][participant]
    return member.publish is not None


async def nothing_published(
    room: MediaRoom, cid: str, offender: TrackingMediaClient, watchers: list[TrackingMediaClient]
) -> None:
    """After the offender's refusals: a chat message sent afterwards reaches every watcher (so
    whatever the refusals could have announced would have arrived first), and no watcher was
    told of, offered or sent a track of the offender's; the relay holds none and made the
    offender no publish connection."""
    pid = offender.peer.participant_id
    speaker = watchers[0]
    text = f"after {offender.peer.label}"
    await speaker.peer.ok("chat", {"text": text})
    for watcher in watchers:
        await watcher.peer.wait_for("chat_message", lambda m: m["text"] == text)
        assert [t for t in watcher.peer.events("track_published") if t["participant"] == pid] == []
        assert [i for i in watcher.offered().values() if i["participant"] == pid] == []
        assert [i for i in watcher.info.values() if i.get("participant") == pid] == []
    assert [t for t in room.hub.tracks(cid) if t.participant == pid] == []
    assert offender.peer.events("publish_answer") == []
    assert not publish_connection_made(room, cid, pid)


async def camera_and_microphone(client: TrackingMediaClient) -> tuple[Offerer, str]:
    """An offer of a camera (mid 0) and a microphone (mid 1)."""
    offerer = Offerer(client)
    offerer.add(ColourCounterTrack((10, 20, 30), **SIZE), "camera")
    offerer.add(ToneTrack(300.0), "microphone")
    sdp = await offerer.sdp()
    assert offerer.named() == {"0": "camera", "1": "microphone"}
    return offerer, sdp


async def test_a_trainee_publishes_nothing_whatever_the_offer_names(
    media_room: MediaRoom,
) -> None:
    cid = (await media_room.server.scheduled(kind=ConsultationKind.TEACHING)).id
    presenter = await media_room.seated(SPECIALIST, cid, label="presenter")
    token, _ = await media_room.server.invite(cid, Role.TRAINEE, "学员")
    trainee = await media_room.admitted(token, cid, presenter.peer, label="trainee")
    offerer, sdp = await camera_and_microphone(trainee)
    for tracks in ({}, {"0": "camera"}, {"1": "microphone"}, offerer.named()):
        await offerer.refused(sdp, tracks, "forbidden")
    await nothing_published(media_room, cid, trainee, [presenter])
    assert presenter.received == {}


async def test_a_coordinator_publishes_nothing_whatever_the_offer_names(
    media_room: MediaRoom,
) -> None:
    cid = (await media_room.server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    coordinator = await media_room.seated(COORDINATOR, cid, label="coordinator")
    offerer, sdp = await camera_and_microphone(coordinator)
    for tracks in ({}, {"0": "camera"}, {"1": "microphone"}, offerer.named()):
        await offerer.refused(sdp, tracks, "forbidden")
    await nothing_published(media_room, cid, coordinator, [village])
    assert village.received == {}


async def test_every_sending_section_must_be_named_with_a_source_of_its_kind(
    media_room: MediaRoom,
) -> None:
    cid = (await media_room.server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    county = await media_room.seated(COUNTY, cid, label="county")
    token, _ = await media_room.server.invite(cid, Role.RESIDENT)
    resident = await media_room.admitted(token, cid, village.peer, label="resident")
    colour, tone = (40, 200, 40), 500.0
    offerer = Offerer(resident)
    offerer.add(ColourCounterTrack(colour, **SIZE), "camera")
    offerer.add(ToneTrack(tone), "microphone")
    # A section the client only receives on needs no name, and publishes nothing.
    offerer.add_receive_only("video")
    sdp = await offerer.sdp()
    assert offerer.named() == {"0": "camera", "1": "microphone"}
    lines = sdp.split("\r\n")
    video_m = next(x for x in lines if x.startswith("m=video "))
    # The same offer with the camera's section "rejected" (port 0) but still sendonly: aiortc
    # ignores the port and would make it a track, so it must be named all the same.
    port_zero = sdp.replace(video_m, "m=video 0 " + video_m.split(" ", 2)[2], 1)
    # And with the camera's section carrying no mid at all: it can never be named.
    no_mid = sdp.replace("a=mid:0\r\n", "", 1)
    cases: list[tuple[str, dict[str, str], str]] = [
        (sdp, {}, "unnamed_section"),
        (sdp, {"0": "camera"}, "unnamed_section"),
        (sdp, {"1": "microphone"}, "unnamed_section"),
        (sdp, {"0": "microphone", "1": "camera"}, "source_mismatch"),
        (sdp, {"0": "camera", "1": "camera"}, "source_mismatch"),
        (sdp, {"0": "camera", "1": "microphone", "7": "screen"}, "unknown_section"),
        (sdp, {"0": "screen", "1": "microphone"}, "forbidden"),
        (port_zero, {"1": "microphone"}, "unnamed_section"),
        (no_mid, {"1": "microphone"}, "unnamed_section"),
    ]
    for offer, tracks, code in cases:
        error = await offerer.refused(offer, tracks, code)
        if code == "forbidden":
            assert "publish_screen" in error["message"], error
    await nothing_published(media_room, cid, resident, [village, county])

    # Named as the web client names them, the same offer publishes: two tracks, not three,
    # and the relay sends nothing on the section the client only receives on.
    assert await offerer.send(sdp, offerer.named()) == {"ok": True}
    answer = resident.peer.events("publish_answer")[0]["sdp"]
    assert re.findall(r"^a=(sendrecv|sendonly|recvonly|inactive)\r$", answer, re.M) == [
        "recvonly",
        "recvonly",
        "inactive",
    ], answer
    pid = resident.peer.participant_id
    announced = await eventually(
        lambda: [t for t in county.peer.events("track_published") if t["participant"] == pid],
        "the resident's tracks are announced",
    )
    assert sorted((t["kind"], t["source"]) for t in announced) == [
        ("audio", "microphone"),
        ("video", "camera"),
    ]
    by_source = {t["source"]: t["track_id"] for t in announced}
    for watcher in (village, county):
        await eventually(
            lambda w=watcher: (
                w.frames_of(by_source["camera"]) >= 15
                and w.frames_of(by_source["microphone"]) >= 50
            ),
            f"{watcher.peer.label} receives the resident",
            within=15,
        )
        picture = watcher.collector(by_source["camera"])
        sound = watcher.collector(by_source["microphone"])
        assert picture is not None and sound is not None
        assert close_to(mean_colour(picture.frames[-1]), colour), watcher.peer.label  # type: ignore[arg-type]
        assert abs(dominant_frequency(sound.frames[-50:]) - tone) < 20, watcher.peer.label  # type: ignore[arg-type]
    assert len([t for t in media_room.hub.tracks(cid) if t.participant == pid]) == 2


async def test_an_offer_with_more_sections_than_the_cap_is_refused(media_room: MediaRoom) -> None:
    cid = (await media_room.server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    specialist = await media_room.seated(SPECIALIST, cid, label="specialist")
    pc = client_peer_connection()
    try:
        for n in range(20):
            pc.addTransceiver(ColourCounterTrack((n, n, n), **SIZE), direction="sendonly")
        many = await local_description(pc, offer=True)
    finally:
        await pc.close()
    assert many.count("\r\nm=video ") == 20
    offerer = Offerer(specialist)
    # The cap comes before the names: named or not, twenty sections are too many.
    await offerer.refused(many, {}, "too_many_sections")
    await offerer.refused(many, {str(n): "camera" for n in range(8)}, "too_many_sections")
    # Nine sections, one over the default cap, even if only one of them sends.
    nine = Offerer(specialist)
    nine.add(ColourCounterTrack((1, 2, 3), **SIZE), "camera")
    for _ in range(8):
        nine.add_receive_only("audio")
    error = await nine.refused(await nine.sdp(), nine.named(), "too_many_sections")
    assert "at most 8" in error["message"], error
    await nothing_published(media_room, cid, specialist, [village])


async def test_tracks_past_the_cap_over_renegotiations_are_refused(media_room: MediaRoom) -> None:
    """A telementoring surgeon's full set (room camera, field camera, screen, microphone, and
    two more) publishes over three offers; a seventh track, and a kept section renamed, are
    refused; all six tracks still arrive, each with its own picture or tone."""
    cid = (await media_room.server.scheduled(kind=ConsultationKind.TELEMENTORING)).id
    surgeon = await media_room.seated(SPECIALIST, cid, label="surgeon")
    mentor = await media_room.seated(COUNTY, cid, label="mentor")
    offerer = Offerer(surgeon)
    pictures = {
        "camera": (200, 60, 60),
        "field_camera": (60, 200, 200),
        "screen": (240, 240, 240),
    }
    tones = [400.0, 700.0, 1000.0]
    steps: list[list[tuple[MediaStreamTrack, str]]] = [
        [
            (ColourCounterTrack(pictures["camera"], **SIZE), "camera"),
            (ToneTrack(tones[0]), "microphone"),
        ],
        [(ColourCounterTrack(pictures["field_camera"], **SIZE), "field_camera")],
        [
            (ColourCounterTrack(pictures["screen"], **SIZE), "screen"),
            (ToneTrack(tones[1]), "microphone"),
            (ToneTrack(tones[2]), "microphone"),
        ],
    ]
    pid = surgeon.peer.participant_id
    published = 0
    for step in steps:
        for track, source in step:
            offerer.add(track, source)
        ack = await offerer.send(await offerer.sdp(), offerer.named())
        assert ack == {"ok": True}, ack
        published += len(step)
        await eventually(
            lambda n=published: (
                len(mentor.offered_from(pid, "video")) + len(mentor.offered_from(pid, "audio")) == n
                and mentor.settled()
            ),
            f"the mentor is offered {published} tracks",
            within=15,
        )
    assert published == 6
    announced = [t for t in mentor.peer.events("track_published") if t["participant"] == pid]
    assert len(announced) == 6

    # A kept section may not change its source (the camera, mid 0, renamed a screen).
    renamed = {**offerer.named(), "0": "screen"}
    await offerer.refused(await offerer.sdp(), renamed, "source_mismatch")
    # A seventh track: seven sections are within the section cap, seven tracks are not.
    offerer.add(ColourCounterTrack((5, 5, 5), **SIZE), "camera")
    error = await offerer.refused(await offerer.sdp(), offerer.named(), "too_many_tracks")
    assert "at most 6" in error["message"], error
    # Nothing new was announced or offered; the six tracks keep arriving, each its own.
    await surgeon.peer.ok("chat", {"text": "继续"})
    await mentor.peer.wait_for("chat_message", lambda m: m["text"] == "继续")
    assert len([t for t in mentor.peer.events("track_published") if t["participant"] == pid]) == 6
    assert len([t for t in media_room.hub.tracks(cid) if t.participant == pid]) == 6
    by_id = {t["track_id"]: t for t in announced}
    for track_id, info in by_id.items():
        enough = 10 if info["kind"] == "video" else 50
        await eventually(
            lambda t=track_id, e=enough: mentor.frames_of(t) >= e,
            f"the mentor receives the surgeon's {info['source']}",
            within=20,
        )
    for source, colour in pictures.items():
        (track_id,) = [t for t, i in by_id.items() if i["source"] == source]
        got = mentor.collector(track_id)
        assert got is not None
        assert close_to(mean_colour(got.frames[-1]), colour), source  # type: ignore[arg-type]
    heard = []
    for track_id in [t for t, i in by_id.items() if i["kind"] == "audio"]:
        got = mentor.collector(track_id)
        assert got is not None
        heard.append(dominant_frequency(got.frames[-50:]))  # type: ignore[arg-type]
    assert all(any(abs(f - tone) < 20 for f in heard) for tone in tones), (heard, tones)


async def test_the_caps_come_from_the_media_config(tmp_path: Path) -> None:
    room = await MediaRoom.start(
        tmp_path, **{"media.max_sections_per_connection": 3, "media.max_tracks_per_participant": 2}
    )
    try:
        cid = (await room.server.scheduled()).id
        village = await room.seated(VILLAGE, cid, label="village")
        county = await room.seated(COUNTY, cid, label="county")
        offerer = Offerer(village)
        offerer.add(ColourCounterTrack((90, 30, 160), **SIZE), "camera")
        offerer.add(ToneTrack(800.0), "microphone")
        assert await offerer.send(await offerer.sdp(), offerer.named()) == {"ok": True}
        offerer.add(ColourCounterTrack((1, 1, 1), **SIZE), "screen")
        error = await offerer.refused(await offerer.sdp(), offerer.named(), "too_many_tracks")
        assert "at most 2" in error["message"], error
        offerer.add_receive_only("audio")
        error = await offerer.refused(await offerer.sdp(), {}, "too_many_sections")
        assert "at most 3" in error["message"], error
        pid = village.peer.participant_id
        await eventually(
            lambda: (
                len(county.offered_from(pid, "video") + county.offered_from(pid, "audio")) == 2
                and county.settled()
            ),
            "the county physician is offered the village doctor's two tracks",
        )
        (video,) = county.offered_from(pid, "video")
        await eventually(lambda: county.frames_of(video) >= 10, "the picture arrives", within=15)
    finally:
        await room.close()


def test_the_track_cap_may_not_exceed_the_section_cap(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_tracks_per_participant"):
        media_config(
            tmp_path,
            **{"media.max_sections_per_connection": 4, "media.max_tracks_per_participant": 5},
        )
    with pytest.raises(ConfigError, match="max_tracks_per_participant"):
        media_config(tmp_path, **{"media.max_tracks_per_participant": 9})


# --- the SDP reading on its own: garbage is a MediaError, never another exception ----------

GOOD_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtpmap:97 VP8/90000\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n"
    "a=fingerprint:sha-256 00:11\r\na=setup:actpass\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=inactive\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
)


def test_sections_are_read_with_mid_kind_and_direction() -> None:
    sections = offered_sections(GOOD_OFFER)
    assert [(s.mid, s.kind, s.direction, s.publishes) for s in sections] == [
        ("0", "video", "sendonly", True),
        ("1", "audio", "inactive", False),
        # No direction attribute: sendrecv, the SDP default.
        ("2", "audio", "sendrecv", True),
    ]
    with pytest.raises(MediaError, match="same mid"):
        offered_sections(GOOD_OFFER.replace("a=mid:2", "a=mid:1"))


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=len(GOOD_OFFER)),
    junk=st.text(max_size=40),
    at=st.integers(min_value=0, max_value=len(GOOD_OFFER)),
)
def test_garbage_sdp_is_a_media_error_and_nothing_else(cut: int, junk: str, at: int) -> None:
    """Cut short, spliced with arbitrary text, or arbitrary text alone."""
    for text in (GOOD_OFFER[:cut], GOOD_OFFER[:at] + junk + GOOD_OFFER[at:], junk):
        try:
            sections = offered_sections(text)
        except MediaError as exc:
            assert exc.code == "media_error"
        else:
            assert all(isinstance(s.kind, str) for s in sections)


def test_the_rule_codes_and_caps_are_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    errors = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", errors, re.M))
    assert set(RULE_CODES) <= table, sorted(set(RULE_CODES) - table)
    limits = text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    for key in ("max_sections_per_connection", "max_tracks_per_participant"):
        assert f"`{key}`" in limits, key
