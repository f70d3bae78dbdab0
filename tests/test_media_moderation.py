"""Moderation reaches the media: a provincial specialist's forced mute stops the muted kind of
track for everyone at once, and a removal ends the removed person's tracks everywhere and
disconnects them. Checked on what the other participants' peer connections receive: after the
moment the server acknowledged the moderator, frames of the silenced track stop arriving (a
short allowance covers packets already on the wire and in the receiver's decoder), while the
other tracks keep coming."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from media_client import MediaRoom, TrackingMediaClient
from media_peers import (
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    mean_colour,
)
from signaling_fixtures import eventually

from rooms.roles import Role
from server.demo import COUNTY, SPECIALIST, TOWNSHIP, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
RESIDENT_COLOUR, RESIDENT_TONE = (40, 200, 40), 500.0
SPECIALIST_COLOUR, SPECIALIST_TONE = (220, 200, 40), 900.0
# What keeps flowing is counted from this long after the server acknowledged a mute (frames
# before it may still be the old picture in aiortc's jitter buffer).
IN_FLIGHT_S = 0.25
# How long a stopped track is watched to stay stopped.
WINDOW_S = 1.0


@dataclass
class Room:
    cid: str
    village: TrackingMediaClient
    resident: TrackingMediaClient
    specialist: TrackingMediaClient
    county: TrackingMediaClient
    # The track ids of the resident's and the specialist's video and audio.
    tracks: dict[tuple[str, str], str]

    @property
    def watchers(self) -> list[TrackingMediaClient]:
        """Who receives both the resident and the specialist."""
        return [self.village, self.county]


async def consultation(room: MediaRoom) -> Room:
    """Village doctor, resident (admitted), specialist and county physician; the resident and
    the specialist publish camera and microphone, and everyone receives them."""
    server = room.server
    cid = (await server.scheduled()).id
    village = await room.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await room.admitted(token, cid, village.peer, label="resident")
    specialist = await room.seated(SPECIALIST, cid, label="specialist")
    county = await room.seated(COUNTY, cid, label="county")
    for client, colour, tone in (
        (resident, RESIDENT_COLOUR, RESIDENT_TONE),
        (specialist, SPECIALIST_COLOUR, SPECIALIST_TONE),
    ):
        ack = await client.publish(
            [(ColourCounterTrack(colour, **SIZE), "camera"), (ToneTrack(tone), "microphone")]
        )
        assert ack == {"ok": True}, ack
    tracks: dict[tuple[str, str], str] = {}
    for who, client in (("resident", resident), ("specialist", specialist)):
        pid = client.peer.participant_id
        for kind in ("video", "audio"):
            await eventually(
                lambda p=pid, k=kind: village.offered_from(p, k), f"{who}'s {kind} offered"
            )
            (tracks[(who, kind)],) = village.offered_from(pid, kind)
    setting = Room(cid, village, resident, specialist, county, tracks)
    for watcher in setting.watchers:
        for (who, kind), track_id in tracks.items():
            enough = 20 if kind == "video" else 40
            await eventually(
                lambda w=watcher, t=track_id, e=enough: w.frames_of(t) >= e,
                f"{watcher.peer.label} receives {who}'s {kind}",
                within=15,
            )
    # The specialist receives the resident too.
    for kind in ("video", "audio"):
        await eventually(
            lambda k=kind: specialist.frames_of(tracks[("resident", k)]) >= 10,
            f"the specialist receives the resident's {kind}",
            within=15,
        )
    return setting


def arrivals_after(client: TrackingMediaClient, track_id: str, moment: float) -> int:
    found = client.collector(track_id)
    assert found is not None, (client.peer.label, track_id)
    return sum(1 for t in found.arrival if t > moment)


async def forwarded(
    room: MediaRoom, cid: str, receivers: list[TrackingMediaClient], track_ids: list[str]
) -> dict[tuple[str, str], int | None]:
    """The relay's count of frames of each of `track_ids` sent to each receiver (None: the
    relay no longer has that track for that receiver)."""
    stats = await room.hub.stats(cid)
    sent = {
        (s["participant"], t["track_id"]): int(s["frames"])
        for t in stats["tracks"]
        for s in t["subscribers"]
    }
    return {
        (c.peer.label, t): sent.get((c.peer.participant_id, t))
        for c in receivers
        for t in track_ids
    }


async def stays_silent(
    room: MediaRoom, cid: str, receivers: list[TrackingMediaClient], track_ids: list[str]
) -> None:
    """Called once the mute (or removal) is acknowledged: for WINDOW_S the relay sends
    `receivers` no frame of `track_ids` (its counts stay as they were), and no receiver gets
    more than the relay had sent it (only what was in flight); a track the relay dropped
    altogether stops arriving. No clock decides what "late" is."""
    at_ack = await forwarded(room, cid, receivers, track_ids)
    await asyncio.sleep(WINDOW_S)
    assert await forwarded(room, cid, receivers, track_ids) == at_ack, "still forwarded"
    gone = {}
    for c in receivers:
        for t in track_ids:
            sent = at_ack[(c.peer.label, t)]
            if sent is None:
                gone[(c, t)] = c.frames_of(t)
            else:
                assert c.frames_of(t) <= sent, (c.peer.label, t, c.frames_of(t), sent)
    if gone:
        await asyncio.sleep(WINDOW_S)
        assert {(c.peer.label, t): c.frames_of(t) - n for (c, t), n in gone.items()} == {
            (c.peer.label, t): 0 for c, t in gone
        }


async def test_forced_mute_stops_audio_then_video_for_everyone(media_room: MediaRoom) -> None:
    r = await consultation(media_room)
    resident_pid = r.resident.peer.participant_id
    specialist_pid = r.specialist.peer.participant_id

    # Audio first: the resident's microphone stops; their camera and the specialist go on.
    await r.specialist.peer.ok("mute", {"participant": resident_pid, "kind": "audio"})
    acked = time.monotonic()
    for client in (*r.watchers, r.resident, r.specialist):
        muted = await client.peer.wait_for("muted")
        assert muted == {"participant": resident_pid, "kind": "audio", "by": specialist_pid}
    await stays_silent(
        media_room, r.cid, [*r.watchers, r.specialist], [r.tracks[("resident", "audio")]]
    )
    for watcher in (*r.watchers, r.specialist):
        # 1 s of 30 fps video and of 50 audio frames a second still arrives (loosely counted).
        assert arrivals_after(watcher, r.tracks[("resident", "video")], acked + IN_FLIGHT_S) >= 15
    for watcher in r.watchers:
        specialist_audio = arrivals_after(
            watcher, r.tracks[("specialist", "audio")], acked + IN_FLIGHT_S
        )
        assert specialist_audio >= 25, (watcher.peer.label, specialist_audio)
        sound = watcher.collector(r.tracks[("specialist", "audio")])
        assert sound is not None
        assert abs(dominant_frequency(sound.frames[-40:]) - SPECIALIST_TONE) < 20  # type: ignore[arg-type]
    # The room's view of the resident says so.
    presence = await media_room.server.presence(r.cid)
    assert presence is not None and presence.participants[resident_pid].audio_muted  # type: ignore[index]

    # Then video: the resident's camera stops too; the specialist's picture goes on.
    await r.specialist.peer.ok("mute", {"participant": resident_pid, "kind": "video"})
    acked = time.monotonic()
    await r.village.peer.wait_for("muted", lambda m: m["kind"] == "video")
    await stays_silent(
        media_room,
        r.cid,
        r.watchers,
        [r.tracks[("resident", "video")], r.tracks[("resident", "audio")]],
    )
    for watcher in r.watchers:
        assert arrivals_after(watcher, r.tracks[("specialist", "video")], acked + IN_FLIGHT_S) >= 15
        picture = watcher.collector(r.tracks[("specialist", "video")])
        assert picture is not None
        assert close_to(mean_colour(picture.frames[-1]), SPECIALIST_COLOUR)  # type: ignore[arg-type]
    # The resident still publishes: the relay holds the frames back, it does not lose the track.
    assert {t.track_id for t in media_room.hub.tracks(r.cid)} >= {
        r.tracks[("resident", "video")],
        r.tracks[("resident", "audio")],
    }


async def test_someone_seated_after_a_mute_does_not_receive_the_muted_track(
    media_room: MediaRoom,
) -> None:
    r = await consultation(media_room)
    resident_pid = r.resident.peer.participant_id
    await r.specialist.peer.ok("mute", {"participant": resident_pid, "kind": "audio"})
    await r.village.peer.wait_for("muted")

    township = await media_room.seated(TOWNSHIP, r.cid, label="township")
    audio, video = r.tracks[("resident", "audio")], r.tracks[("resident", "video")]
    await eventually(lambda: township.offered_from(resident_pid, "video"), "township's offer")
    await eventually(lambda: township.frames_of(video) >= 30, "township sees the resident")
    # A second of the resident's picture has arrived; none of their muted microphone may have.
    assert township.frames_of(audio) == 0, township.frames_of(audio)


async def test_removal_ends_the_removed_persons_tracks_and_connection(
    media_room: MediaRoom,
) -> None:
    r = await consultation(media_room)
    resident_pid = r.resident.peer.participant_id
    specialist_pid = r.specialist.peer.participant_id
    resident_tracks = {r.tracks[("resident", "video")], r.tracks[("resident", "audio")]}

    await r.specialist.peer.ok("remove", {"participant": resident_pid, "reason": "disruptive"})
    acked = time.monotonic()

    # The removed connection is told, then disconnected by the server.
    removed = await r.resident.peer.wait_for("removed")
    assert removed == {"participant": resident_pid, "by": specialist_pid, "reason": "disruptive"}
    await r.resident.peer.wait_disconnected()
    # Everyone left in the room hears that each of the resident's tracks is gone.
    for client in (*r.watchers, r.specialist):
        await eventually(
            lambda c=client: (
                {t["track_id"] for t in c.peer.events("track_unpublished")} >= resident_tracks
            ),
            f"{client.peer.label} receives track_unpublished for the resident's tracks",
        )
        gone = [
            t for t in client.peer.events("track_unpublished") if t["track_id"] in resident_tracks
        ]
        assert sorted((t["participant"], t["kind"]) for t in gone) == [
            (resident_pid, "audio"),
            (resident_pid, "video"),
        ]
        left = await client.peer.wait_for("participant_left")
        assert left == {"participant": resident_pid, "reason": "kicked"}

    await stays_silent(media_room, r.cid, r.watchers, sorted(resident_tracks))
    for watcher in r.watchers:
        assert arrivals_after(watcher, r.tracks[("specialist", "video")], acked + IN_FLIGHT_S) >= 15
        # The newest offer no longer carries the resident.
        assert not watcher.offered_from(resident_pid, "video")
        assert not watcher.offered_from(resident_pid, "audio")
    assert resident_pid not in media_room.hub.members(r.cid)
    assert all(t.participant != resident_pid for t in media_room.hub.tracks(r.cid))
    # And the removed person may not come back to this session.
    comeback = await media_room.server.connect(
        (await media_room.server.invite(r.cid, Role.RESIDENT))[0], label="comeback"
    )
    refused = await comeback.refused("join", {"consultation_id": r.cid, "device": "default"})
    assert refused["code"] == "removed"
