"""Connection changes with real aiortc peers and the real server (docs/protocol.md, Connection
changes): the village doctor's clinic changes its address in the middle of a recorded
consultation. Both of its peer connections reach the relay through a `lossy_link.LossyLink`
(what the relay sees as the clinic's address); the cut closes those links (the old address is
gone: nothing passes either way), the move puts new ones, on new ports, in their place, and the
clinic restarts ICE on both connections — over its signaling socket as it is, or over a new
one that takes the seat back with `keep_media`, as after an address change that also killed
the socket's TCP connection.

Checked: the media is gone during the cut and comes back both ways with its content (the
village's red picture with its frame counter going on, its 440 Hz tone; the county physician's
green picture and 660 Hz tone); the relay restarted ICE on both connections rather than making
new ones; the seat, its tracks and the others' connections are untouched (no participant or
track announcement, no new subscribe offer for anyone else, the resident's picture of the
county physician never stops); the recording goes on in the same segments, and the village's
segment holds its red picture after the move."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aioice
import av
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamTrack
from lossy_link import Impairment, LossyLink
from media_client import MediaRoom, TrackingMediaClient, client_peer_connection
from media_peers import (
    LOOPBACK,
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    mean_colour,
    read_counter,
)
from recording_server_helpers import decoded, recordings_of
from signaling_fixtures import COUNTY, VILLAGE, Peer, SignalingServer, eventually

from media.ice_hosts import offer_host_addresses
from media.ice_restart import (
    internals_problems,
    restart_on_next_offer,
    restarts_done,
    set_local_description,
    set_remote_description,
)
from media.receiver_tap import media_ssrcs
from rooms.model import RecordingState
from rooms.roles import Role

pytest_plugins = ["signaling_fixtures", "media_client"]

RED, GREEN, BLUE = (220, 40, 40), (40, 200, 40), (40, 40, 220)
VILLAGE_TONE, COUNTY_TONE = 440.0, 660.0
SIZE = {"width": 160, "height": 120}
# Generous bounds for conditions on a busy two-core machine; a condition met returns at once.
MEDIA_WAIT = 60.0
# Announcements that would mean the seat or a track went and came back.
CHURN = ("participant_left", "participant_joined", "track_unpublished", "track_published")


async def describe(pc: RTCPeerConnection, offer: bool) -> str:
    """Our local description (offer or answer), restart-aware, with loopback candidates."""
    offer_host_addresses(pc, LOOPBACK)
    description = await (pc.createOffer() if offer else pc.createAnswer())
    await set_local_description(pc, description)
    return pc.localDescription.sdp


class MovingClient(TrackingMediaClient):
    """A clinic whose network changes. Its publish connection goes through `publish_link`, its
    subscribe connection through `subscribe_link`; `cut()` closes both links, `move()` opens
    new ones, and the next negotiation on each connection goes through the new one."""

    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self.publish_link = LossyLink(Impairment())
        self.subscribe_link = LossyLink(Impairment())
        self.links = [self.publish_link, self.subscribe_link]
        # While set, subscribe offers reaching this client are lost (its old socket is dead).
        self.deaf = False
        self.lost_offers: list[dict[str, dict[str, Any]]] = []
        # Subscribe connections given up because the relay made a new one.
        self.replaced: list[RTCPeerConnection] = []
        self._plis: set[asyncio.Future[None]] = set()

    async def open_links(self) -> None:
        for link in self.links:
            await link.open()

    def cut(self) -> None:
        for link in self.links:
            link.close()

    async def move(self) -> None:
        self.publish_link = LossyLink(Impairment())
        self.subscribe_link = LossyLink(Impairment())
        self.links += [self.publish_link, self.subscribe_link]
        await self.publish_link.open()
        await self.subscribe_link.open()

    async def _on_offer(self, data: dict[str, Any]) -> None:
        if self.deaf:
            self.lost_offers.append(data["tracks"])
        else:
            await super()._on_offer(data)

    async def answer_subscribe_offer(self, offer_sdp: str) -> str:
        # The relay offers here: its candidates move onto the link's client side, ours (in
        # the answer) onto its server side.
        link = self.subscribe_link
        current = self.subscriber.remoteDescription
        if current is not None and fingerprints(current.sdp) != fingerprints(offer_sdp):
            # The relay replaced its side (it could not restart): a new connection, as the
            # web client makes one.
            self.replaced.append(self.subscriber)
            self.subscriber = client_peer_connection()
            self.subscriber.on("track", self._on_track)
        offer = RTCSessionDescription(link.answer_through(offer_sdp), "offer")
        restarted = await set_remote_description(self.subscriber, offer)
        answer = link.offer_through(await describe(self.subscriber, offer=False))
        if restarted:
            self._resync_video()
        return answer

    def _resync_video(self) -> None:
        """After a restart, as a browser does after a gap: a keyframe request for each received
        video. aiortc's own jitter buffer would wait for the packets lost in the cut until 512
        newer ones had come (aiortc/jitterbuffer.py, ~15 s here): it starts afresh instead."""
        for transceiver in self.subscriber.getTransceivers():
            receiver: Any = transceiver.receiver
            if transceiver.kind != "video" or receiver.track is None:
                continue
            receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=512, is_video=True)
            for ssrc in media_ssrcs(receiver):
                self._plis.add(asyncio.ensure_future(receiver._send_rtcp_pli(ssrc)))

    async def publish_through_link(self, tracks: list[tuple[MediaStreamTrack, str]]) -> None:
        for track, _ in tracks:
            self.publisher.addTransceiver(track, direction="sendonly")
        await self._offer_publish()

    async def restart(self) -> dict[str, Any]:
        """ICE restarts on both connections; returns restart_subscribe's result."""
        restart_on_next_offer(self.publisher)
        await self._offer_publish()
        ack = await self.peer.ok("restart_subscribe")
        result: dict[str, Any] = ack["result"]
        return result

    async def _offer_publish(self) -> None:
        link = self.publish_link
        offer = link.offer_through(await describe(self.publisher, offer=True))
        sources = {
            t.mid: ("camera" if t.kind == "video" else "microphone")
            for t in self.publisher.getTransceivers()
            if t.mid is not None
        }
        before = len(self.peer.events("publish_answer"))
        await self.peer.ok("publish_offer", {"sdp": offer, "tracks": sources})
        await eventually(lambda: len(self.peer.events("publish_answer")) > before, "the answer")
        answer = self.peer.events("publish_answer")[before]["sdp"]
        await set_remote_description(
            self.publisher, RTCSessionDescription(link.answer_through(answer), "answer")
        )

    async def reconnect(self, server: SignalingServer, cid: str) -> dict[str, Any]:
        """A new signaling connection for the same device, joining with `keep_media`; the old
        one is left as a lost network leaves it (the server has not noticed: the join takes
        the seat over). Returns the new `joined`."""
        peer = await server.connect(VILLAGE, label="village again")
        peer.sio.on("subscribe_offer", self._on_offer, namespace="/consult")
        self.peer = peer
        self.deaf = False
        await peer.ok("join", {"consultation_id": cid, "keep_media": True})
        joined: dict[str, Any] = await peer.wait_for("joined")
        return joined


def fingerprints(sdp: str) -> set[str]:
    return {line.split(":", 1)[1] for line in sdp.splitlines() if line.startswith("a=fingerprint:")}


def frames_after(client: TrackingMediaClient, track_id: str, since: float) -> list[Any]:
    """The frames of `track_id` that arrived at `client` after `since` (time.monotonic())."""
    got = client.collector(track_id)
    if got is None:
        return []
    return [f for f, at in zip(got.frames, got.arrival, strict=True) if at > since]


def video_after(client: TrackingMediaClient, track_id: str, since: float) -> list[av.VideoFrame]:
    return [f for f in frames_after(client, track_id, since) if isinstance(f, av.VideoFrame)]


def audio_after(client: TrackingMediaClient, track_id: str, since: float) -> list[av.AudioFrame]:
    return [f for f in frames_after(client, track_id, since) if isinstance(f, av.AudioFrame)]


async def stalled(client: TrackingMediaClient, track_id: str) -> bool:
    """No frame of `track_id` for half a second."""
    before = client.frames_of(track_id)
    await asyncio.sleep(0.5)
    return client.frames_of(track_id) == before


def churn(peer: Peer, since: int, seat: str) -> list[tuple[str, Any]]:
    """The announcements `peer` heard since `since` that say `seat` or one of its tracks went
    or came."""
    return [
        (r.event, r.data)
        for r in peer.received[since:]
        if r.event in CHURN and seat in (r.data.get("participant"), r.data.get("participant_id"))
    ]


def tracks_of(offer: dict[str, dict[str, Any]], seat: str) -> dict[str, str]:
    """Which mid carries which of `seat`'s tracks in a subscribe offer."""
    return {mid: info["track_id"] for mid, info in offer.items() if info["participant"] == seat}


async def publish_another(
    client: TrackingMediaClient, track: MediaStreamTrack, source: str
) -> None:
    """One more section on the client's publish connection, every section named again."""
    client.publisher.addTransceiver(track, direction="sendonly")
    offer = await describe(client.publisher, offer=True)
    named = {"video": "camera", "audio": "microphone"}
    sources = {
        t.mid: named[t.kind] if i < len(client.publisher.getTransceivers()) - 1 else source
        for i, t in enumerate(client.publisher.getTransceivers())
        if t.mid is not None
    }
    before = len(client.peer.events("publish_answer"))
    await client.peer.ok("publish_offer", {"sdp": offer, "tracks": sources})
    await eventually(lambda: len(client.peer.events("publish_answer")) > before, "the answer")
    answer = client.peer.events("publish_answer")[before]["sdp"]
    await client.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))


def relay_connections(room: MediaRoom, cid: str, participant: str) -> tuple[Any, Any]:
    """The relay's publish and subscribe peer connections of a participant (hub internals)."""
    member = room.hub._rooms[cid][participant]
    return member.publish.pc, member.subscribe.pc


@pytest.mark.parametrize("new_socket", [False, True], ids=["same socket", "new socket"])
async def test_a_clinic_that_changes_address_keeps_its_seat_media_and_recording(
    media_room: MediaRoom, new_socket: bool
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    village = MovingClient(await server.connect(VILLAGE, label="village"))
    media_room.clients.append(village)
    await village.open_links()
    try:
        await village.peer.join(cid)
        await village.peer.wait_for("joined")
        county = await media_room.seated(COUNTY, cid, label="county")
        token, _ = await server.invite(cid, Role.RESIDENT)
        resident = await media_room.admitted(token, cid, village.peer, label="resident")

        camera = ColourCounterTrack(RED, **SIZE)
        await village.publish_through_link(
            [(camera, "camera"), (ToneTrack(VILLAGE_TONE), "microphone")]
        )
        assert await county.publish(
            [(ColourCounterTrack(GREEN, **SIZE), "camera"), (ToneTrack(COUNTY_TONE), "microphone")]
        ) == {"ok": True}
        seat = village.peer.participant_id
        county_pid = county.peer.participant_id

        def track(client: TrackingMediaClient, of: str, kind: str) -> str | None:
            ids = client.offered_from(of, kind)
            return ids[0] if len(ids) == 1 else None

        await eventually(
            lambda: all(
                track(c, of, k)
                for c, of in ((county, seat), (village, county_pid), (resident, county_pid))
                for k in ("video", "audio")
            ),
            "everyone offered the others' tracks",
            within=MEDIA_WAIT,
        )
        red_id, red_tone = track(county, seat, "video"), track(county, seat, "audio")
        green_id, green_tone = (
            track(village, county_pid, "video"),
            track(village, county_pid, "audio"),
        )
        assert red_id and red_tone and green_id and green_tone
        resident_green = track(resident, county_pid, "video")
        assert resident_green

        await resident.peer.ok("consent", {"kind": "recording", "granted": True})
        await village.peer.ok("start_recording")

        async def segments(count: int = 4) -> list[Any] | None:
            rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
            return rows if len(rows) == count else None

        before_rows = await eventually(segments, "a segment per track", within=MEDIA_WAIT)
        for client, video in ((county, red_id), (village, green_id), (resident, resident_green)):
            await eventually(
                lambda c=client, v=video: c.frames_of(v) >= 15, "video flowing", within=MEDIA_WAIT
            )
        relay_publish, relay_subscribe = relay_connections(media_room, cid, seat)
        marks = {p.label: len(p.received) for p in (county.peer, resident.peer)}
        seat_in_offers = {c.peer.label: tracks_of(c.offered(), seat) for c in (county, resident)}
        county_offers = len(county.offers)

        # The clinic's address goes: nothing passes either way. With it its socket, in the
        # second run: what the relay sends the village meanwhile is lost.
        village.cut()
        village.deaf = new_socket
        await eventually(lambda: stalled(county, red_id), "the village's picture to stop")
        await eventually(
            lambda: stalled(village, green_id), "the county's picture to stop at the village"
        )
        last_counter = max(read_counter(f) for f in video_after(county, red_id, 0.0)[-5:])
        resident_frames = resident.frames_of(resident_green)
        await asyncio.sleep(1.0)
        # Everyone else goes on meanwhile; the county physician adds a field camera, so the
        # relay offers the village one more track while it is away.
        assert resident.frames_of(resident_green) > resident_frames
        await publish_another(county, ColourCounterTrack(BLUE, **SIZE), "field_camera")
        await eventually(
            lambda: any(
                i["source"] == "field_camera"
                for o in [*village.offers, *village.lost_offers]
                for i in o.values()
            ),
            "the offer of the field camera to reach the village's (old) socket",
        )

        # A new address, and ICE restarts on both connections.
        await village.move()
        back = time.monotonic()
        moved_at = datetime.now(UTC)
        if new_socket:
            joined = await village.reconnect(server, cid)
            assert joined["media_kept"] is True, joined
            assert joined["you"]["participant_id"] == seat
        assert await village.restart() == {"subscribe": "restarted"}

        # Media both ways again, with its content.
        def fresh_red() -> bool:
            frames = video_after(county, red_id, back)
            return len(frames) >= 10 and close_to(mean_colour(frames[-1]), RED)

        def fresh_green() -> bool:
            frames = video_after(village, green_id, back)
            return len(frames) >= 10 and close_to(mean_colour(frames[-1]), GREEN)

        await eventually(fresh_red, "the village's picture again at the county", within=MEDIA_WAIT)

        def fresh_blue() -> bool:
            ids = [
                i["track_id"]
                for i in village.offered().values()
                if i["source"] == "field_camera" and i["participant"] == county_pid
            ]
            frames = video_after(village, ids[0], back) if ids else []
            return len(frames) >= 10 and close_to(mean_colour(frames[-1]), BLUE)

        await eventually(fresh_blue, "the field camera at the village", within=MEDIA_WAIT)
        await eventually(
            fresh_green, "the county's picture again at the village", within=MEDIA_WAIT
        )
        counters = [read_counter(f) for f in video_after(county, red_id, back)]
        assert counters[-1] > last_counter, (last_counter, counters[-10:])
        await eventually(
            lambda: len(audio_after(county, red_tone, back)) >= 100, "the village's tone again"
        )
        await eventually(
            lambda: len(audio_after(village, green_tone, back)) >= 100, "the county's tone again"
        )
        assert (
            abs(dominant_frequency(audio_after(county, red_tone, back)[-50:]) - VILLAGE_TONE) < 20
        )
        assert (
            abs(dominant_frequency(audio_after(village, green_tone, back)[-50:]) - COUNTY_TONE) < 20
        )

        # The relay restarted ICE on the connections it had; it made no new ones.
        assert relay_connections(media_room, cid, seat) == (relay_publish, relay_subscribe)
        await eventually(
            lambda: restarts_done(relay_publish) == 1 and restarts_done(relay_subscribe) == 1,
            "both of the relay's restarts to find their new path",
        )
        # Nobody else saw anything of it: no seat or track of the village went and came back,
        # every offer since kept its tracks where they were, the county got no offer at all.
        assert village.peer.participant_id == seat
        for peer in (county.peer, resident.peer):
            assert churn(peer, marks[peer.label], seat) == [], peer.label
        assert len(county.offers) == county_offers
        assert all(tracks_of(o, seat) == seat_in_offers["resident"] for o in resident.offers[-3:])

        # The recording went on in the same segments (one more: the field camera), the
        # village's picture in it after the move.
        rows = await segments(5)
        assert rows is not None
        kept = {r.id for r, _ in rows if r.source != "field_camera"}
        assert kept == {r.id for r, _ in before_rows}
        assert all(r.state == RecordingState.RECORDING.value for r, _ in rows)
        await asyncio.sleep(1.0)
        await village.peer.ok("end_session")

        async def closed() -> list[Any] | None:
            found = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
            return (
                found if all(r.state != RecordingState.RECORDING.value for r, _ in found) else None
            )

        rows = await eventually(closed, "every segment closed", within=MEDIA_WAIT)
        (red_row, red_path) = next(
            (r, p)
            for r, p in rows
            if str(r.participant_id) == seat and r.media_type == "video/webm"
        )
        assert red_row.state == RecordingState.COMPLETE.value and red_path is not None
        recorded = decoded(server.app, red_path)
        after_move = (moved_at - red_row.started_at).total_seconds()
        late = [f for f in recorded.video if f.time is not None and f.time > after_move]
        assert len(late) >= 10, (after_move, recorded.duration_s)
        assert close_to(mean_colour(late[-1]), RED)
        assert read_counter(late[-1]) > last_counter
    finally:
        for link in village.links:
            link.close()


# --- where a restart cannot be done ---------------------------------------------------------


async def room_with_a_moving_clinic(
    media_room: MediaRoom,
) -> tuple[str, MovingClient, TrackingMediaClient]:
    """The village doctor (through links) and the county physician, each publishing a camera
    that the other receives."""
    server = media_room.server
    cid = (await server.scheduled()).id
    village = MovingClient(await server.connect(VILLAGE, label="village"))
    media_room.clients.append(village)
    await village.open_links()
    await village.peer.join(cid)
    await village.peer.wait_for("joined")
    county = await media_room.seated(COUNTY, cid, label="county")
    await village.publish_through_link([(ColourCounterTrack(RED, **SIZE), "camera")])
    assert await county.publish([(ColourCounterTrack(GREEN, **SIZE), "camera")]) == {"ok": True}
    for client, of in (
        (village, county.peer.participant_id),
        (county, village.peer.participant_id),
    ):
        await eventually(
            lambda c=client, p=of: (
                len(c.offered_from(p, "video")) == 1
                and c.frames_of(c.offered_from(p, "video")[0]) >= 5
            ),
            "video both ways",
            within=MEDIA_WAIT,
        )
    return cid, village, county


async def test_a_subscribe_connection_that_closed_is_replaced_by_the_restart(
    media_room: MediaRoom,
) -> None:
    """The relay's subscribe connection closed (as when aioice's consent checks gave up after
    30 s without the peer): `restart_subscribe` makes a new one with the same tracks, which the
    client takes from its new certificate; the county physician notices nothing."""
    cid, village, county = await room_with_a_moving_clinic(media_room)
    try:
        seat, county_pid = village.peer.participant_id, county.peer.participant_id
        (green_id,) = village.offered_from(county_pid, "video")
        relay_publish, relay_subscribe = relay_connections(media_room, cid, seat)
        mark = len(county.peer.received)
        county_offers = len(county.offers)
        # Cut first, so that the client hears nothing of the close (as after a long outage).
        village.cut()
        await relay_subscribe.close()
        await village.move()
        # The publish connection still restarts; the subscribe one cannot.
        assert await village.restart() == {"subscribe": "replaced"}
        back = time.monotonic()

        def fresh_green() -> bool:
            frames = video_after(village, green_id, back)
            return len(frames) >= 10 and close_to(mean_colour(frames[-1]), GREEN)

        await eventually(
            fresh_green, "the county's picture on the new connection", within=MEDIA_WAIT
        )
        assert len(village.replaced) == 1
        assert village.offered_from(county_pid, "video") == [green_id]  # the same track
        publish_now, subscribe_now = relay_connections(media_room, cid, seat)
        assert publish_now is relay_publish and subscribe_now is not relay_subscribe
        seat_now = village.peer.participant_id
        assert churn(county.peer, mark, seat_now) == [] and len(county.offers) == county_offers
    finally:
        for link in village.links:
            link.close()
        for pc in village.replaced:
            await pc.close()


async def test_a_publish_connection_that_closed_cannot_restart_and_starts_afresh(
    media_room: MediaRoom,
) -> None:
    """The relay's publish connection closed: a restart offer on it is refused with a reason,
    and a reconnect asking to keep the media is told it was not kept (`media_kept` false): the
    seat's media starts afresh, as before connection changes were handled."""
    cid, village, county = await room_with_a_moving_clinic(media_room)
    try:
        seat = village.peer.participant_id
        relay_publish, _ = relay_connections(media_room, cid, seat)
        village.cut()
        await relay_publish.close()
        await village.move()
        restart_on_next_offer(village.publisher)
        offer = village.publish_link.offer_through(await describe(village.publisher, offer=True))
        error = await village.peer.refused(
            "publish_offer", {"sdp": offer, "tracks": {"0": "camera"}}
        )
        assert error["code"] == "media_error", error
        assert "publish connection has closed" in error["message"], error

        joined = await village.reconnect(media_room.server, cid)
        assert joined["media_kept"] is False, joined
        assert joined["you"]["participant_id"] == seat
        # The fresh start: the room sees the seat's track end (and would see it come back).
        await county.peer.wait_for("track_unpublished", lambda t: t["participant"] == seat)
    finally:
        for link in village.links:
            link.close()


async def test_a_restart_offer_without_candidates_is_refused_and_changes_nothing(
    media_room: MediaRoom,
) -> None:
    """A restart with no candidate (a browser that has no network yet) cannot find a path:
    refused, and the connection goes on as it was."""
    _, village, county = await room_with_a_moving_clinic(media_room)
    try:
        seat = village.peer.participant_id
        (red_id,) = county.offered_from(seat, "video")
        restart_on_next_offer(village.publisher)
        offer = await describe(village.publisher, offer=True)
        bare = "".join(
            line for line in offer.splitlines(keepends=True) if not line.startswith("a=candidate:")
        )
        error = await village.peer.refused(
            "publish_offer", {"sdp": bare, "tracks": {"0": "camera"}}
        )
        assert error["code"] == "media_error", error
        assert "no candidates" in error["message"], error
        before = county.frames_of(red_id)
        await eventually(lambda: county.frames_of(red_id) >= before + 10, "the picture going on")
    finally:
        for link in village.links:
            link.close()


async def test_keep_media_on_a_first_join_or_with_a_wrong_type(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    peer = await server.connect(VILLAGE, label="village")
    error = await peer.refused("join", {"consultation_id": cid, "keep_media": "yes"})
    assert error["code"] == "invalid_payload" and "keep_media" in error["message"], error
    # Nothing to keep on a first join: the seat's media is new.
    await peer.ok("join", {"consultation_id": cid, "keep_media": True})
    assert (await peer.wait_for("joined"))["media_kept"] is False
    assert (await peer.ok("restart_subscribe"))["result"] == {"subscribe": "none"}
    error = await peer.refused("restart_subscribe", {"now": True})
    assert error["code"] == "invalid_payload", error


def test_the_internals_the_restart_relies_on_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert internals_problems() == []

    def complete_otherwise(self: aioice.Connection) -> bool:
        return bool(self._nominated)

    monkeypatch.setattr(aioice.Connection, "_check_list_maybe_complete", complete_otherwise)
    assert internals_problems() == [
        "missing: aioice completes the check list through _check_list_state"
    ]
