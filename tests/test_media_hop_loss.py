"""Per-hop loss, with real aiortc peers, the real server and `lossy_link.LossyLink` (a seeded
lossy UDP proxy) on one hop: what the relay reports for the publisher's link into it (intake)
and for each subscriber's link (from that subscriber's receiver reports), over REST and at
/metrics, against what the proxy dropped.

The relay renumbers what it forwards, so loss on the publisher's hop never shows in a
subscriber's own statistics: only the intake figures show it. A subscriber's own bad link
shows on that subscriber only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from lossy_link import Impairment, LossyLink
from lossy_media import LossySubscriber, StoppableTone, publish_through, settled
from media_client import MediaRoom, TrackingMediaClient
from media_peers import ColourCounterTrack, ToneTrack
from signaling_fixtures import SignalingServer, eventually

from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

LOSS = 0.05
# Audio frames (20 ms) sent while the figures are gathered: 8 s, about 20 lost at 5 %.
WINDOW_FRAMES = 400


async def media_stats(server: SignalingServer, cid: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {server.token(VILLAGE)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/v1/consultations/{cid}/media", headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def metrics(server: SignalingServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        assert r.status == 200
        return await r.text()


def track_of(stats: dict[str, Any], track_id: str) -> dict[str, Any]:
    track: dict[str, Any] = next(t for t in stats["tracks"] if t["track_id"] == track_id)
    return track


def subscriber_of(stats: dict[str, Any], track_id: str, participant: str) -> dict[str, Any]:
    subscriber: dict[str, Any] = next(
        s for s in track_of(stats, track_id)["subscribers"] if s["participant"] == participant
    )
    return subscriber


def series(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels`."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match.group(2)))
    assert len(found) == 1, (name, labels, found)
    return found[0]


def sender_ssrc(room: MediaRoom, cid: str, subscriber: str, track_id: str) -> int:
    """The SSRC the relay sends `track_id` to `subscriber` with (what the proxy counts by)."""
    members: dict[str, Any] = room.hub._rooms[cid]
    publication = next(
        p.publication for m in members.values() for t, p in m.published.items() if t == track_id
    )
    outgoing = members[subscriber].subscribe.tracks[id(publication)]
    ssrc: int = outgoing.transceiver.sender._ssrc
    return ssrc


def near(reported: int, dropped: int) -> bool:
    """Equal but for a few packets lost at the very end (the relay or the subscriber learns
    of a loss only from a later packet) and a report in flight."""
    return abs(reported - dropped) <= max(4, dropped // 10)


async def test_loss_on_the_publishers_link_shows_at_the_relays_intake_only(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    village = await media_room.seated(VILLAGE, cid, label="village")
    link = LossyLink(Impairment(loss=LOSS), seed=5)
    await link.open()
    try:
        tone = StoppableTone(440.0)
        camera = ColourCounterTrack((200, 40, 40), width=320, height=240, noise=True)
        await publish_through(county, link, [(tone, "microphone"), (camera, "camera")])
        senders = {t.sender.kind: t.sender for t in county.publisher.getTransceivers()}
        audio_ssrc, video_ssrc = senders["audio"]._ssrc, senders["video"]._ssrc
        county_pid, village_pid = county.peer.participant_id, village.peer.participant_id
        audio_id, video_id = await both_offered(village, county_pid)
        await eventually(
            lambda: village.frames_of(audio_id) > 0 and village.frames_of(video_id) > 0,
            "audio and video at the subscriber",
        )

        # While the link loses, the relay's intake shows it within a second.
        async def intake_loss_seen() -> bool:
            intake = track_of(await media_stats(server, cid), video_id)["intake"]
            return bool(intake["fraction_lost"])

        await eventually(intake_loss_seen, "loss in the video intake's fraction_lost")

        start = tone.frames_sent
        await eventually(
            lambda: tone.frames_sent - start >= WINDOW_FRAMES,
            f"{WINDOW_FRAMES} audio frames sent",
            within=WINDOW_FRAMES * 0.02 + 30,
        )
        tone.stop()
        await settled(lambda: village.frames_of(audio_id), "the audio at the subscriber")

        stats = await media_stats(server, cid)
        audio_in = track_of(stats, audio_id)["intake"]
        video_in = track_of(stats, video_id)["intake"]
        dropped_audio = link.uplink.lost[audio_ssrc]
        dropped_video = link.uplink.lost[video_ssrc]
        summary = (
            f"proxy dropped audio {dropped_audio} of "
            f"{dropped_audio + link.uplink.passed[audio_ssrc]}, video {dropped_video} of "
            f"{dropped_video + link.uplink.passed[video_ssrc]}; audio intake {audio_in}; "
            f"video intake {video_in}"
        )
        print(summary)
        assert dropped_audio >= 0.02 * audio_in["packets_expected"], summary  # it did lose
        assert near(audio_in["packets_lost"], dropped_audio), summary
        # Audio is never repaired: what the link lost is given up, never waited for.
        assert near(audio_in["packets_given_up"], dropped_audio), summary
        # Everything else came in time (but for a gap before the last packets, which the
        # next packet would give up).
        unaccounted = (
            audio_in["packets_expected"]
            - audio_in["packets_given_up"]
            - audio_in["packets_received"]
        )
        assert 0 <= unaccounted <= 3, summary
        assert near(video_in["packets_lost"], dropped_video), summary
        # Video is repaired: most of what was lost came again over RTX after a NACK.
        assert video_in["nacks_sent"] > 0 and video_in["packets_retransmitted"] > 0, summary
        assert video_in["packets_given_up"] < video_in["packets_lost"] / 2, summary

        # The subscriber's own link is clean, and says so: the publisher's loss is not in it.
        await eventually(
            lambda: village_report_in(media_room, server, cid, audio_id, village_pid),
            "a receiver report from the subscriber",
        )
        stats = await media_stats(server, cid)
        village_audio = subscriber_of(stats, audio_id, village_pid)
        assert village_audio["packets_lost"] <= 1, village_audio
        assert village_audio["packets_sent"] > 0.9 * WINDOW_FRAMES, village_audio

        text = await metrics(server)
        intake_labels = {
            "consultation": cid,
            "participant": county_pid,
            "track": audio_id,
            "kind": "audio",
            "direction": "intake",
        }
        assert (
            series(text, "telemed_media_hop_packets_lost_total", **intake_labels)
            == (audio_in["packets_lost"])
        )
        assert (
            series(text, "telemed_media_hop_packets_expected_total", **intake_labels)
            == (audio_in["packets_expected"])
        )
        assert (
            series(
                text,
                "telemed_media_hop_packets_lost_total",
                participant=village_pid,
                track=audio_id,
                direction="subscriber",
            )
            <= 1
        )
    finally:
        link.close()


async def village_report_in(
    room: MediaRoom, server: SignalingServer, cid: str, track_id: str, participant: str
) -> bool:
    stats = await media_stats(server, cid)
    return subscriber_of(stats, track_id, participant)["packets_lost"] is not None


async def both_offered(client: TrackingMediaClient, publisher: str) -> tuple[str, str]:
    await eventually(
        lambda: (
            len(client.offered_from(publisher, "audio")) == 1
            and len(client.offered_from(publisher, "video")) == 1
        ),
        "the subscriber's offer of both tracks",
    )
    (audio_id,) = client.offered_from(publisher, "audio")
    (video_id,) = client.offered_from(publisher, "video")
    return audio_id, video_id


@dataclass
class LossyDownlink:
    """County publishes a tone to two subscribers: village through `link`, specialist direct."""

    cid: str
    county: TrackingMediaClient
    village: LossySubscriber
    specialist: TrackingMediaClient
    tone: StoppableTone
    audio_id: str


async def audio_to_a_lossy_subscriber(media_room: MediaRoom, link: LossyLink) -> LossyDownlink:
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    specialist = await media_room.seated(SPECIALIST, cid, label="specialist")
    village = LossySubscriber(await server.connect(VILLAGE, label="village"), link)
    media_room.clients.append(village)
    await village.peer.join(cid, "default")
    await village.peer.wait_for("joined")
    tone = StoppableTone(660.0)
    assert await county.publish([(tone, "microphone")]) == {"ok": True}
    county_pid = county.peer.participant_id
    await eventually(
        lambda: (
            len(village.offered_from(county_pid, "audio")) == 1
            and len(specialist.offered_from(county_pid, "audio")) == 1
        ),
        "both subscribers offered the audio",
    )
    (audio_id,) = village.offered_from(county_pid, "audio")
    await eventually(
        lambda: village.frames_of(audio_id) > 0 and specialist.frames_of(audio_id) > 0,
        "audio at both subscribers",
    )
    return LossyDownlink(cid, county, village, specialist, tone, audio_id)


async def test_a_subscribers_lossy_link_shows_on_that_subscriber_only(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    link = LossyLink(Impairment(), Impairment(loss=LOSS), seed=9)
    await link.open()
    try:
        call = await audio_to_a_lossy_subscriber(media_room, link)
        cid, village, specialist, tone, audio_id = (
            call.cid,
            call.village,
            call.specialist,
            call.tone,
            call.audio_id,
        )
        village_pid, specialist_pid = village.peer.participant_id, specialist.peer.participant_id
        start = tone.frames_sent
        await eventually(
            lambda: tone.frames_sent - start >= WINDOW_FRAMES,
            f"{WINDOW_FRAMES} audio frames sent",
            within=WINDOW_FRAMES * 0.02 + 30,
        )
        tone.stop()
        await settled(lambda: village.frames_of(audio_id), "the audio at the lossy subscriber")
        dropped = link.downlink.lost[sender_ssrc(media_room, cid, village_pid, audio_id)]
        assert dropped >= 0.02 * WINDOW_FRAMES, dropped  # the link did lose

        # Receiver reports come every 0.5-1.5 s; the last ones count everything sent.
        async def reported() -> dict[str, Any] | None:
            stats = await media_stats(server, cid)
            village_audio = subscriber_of(stats, audio_id, village_pid)
            lost = village_audio["packets_lost"]
            return stats if lost is not None and near(lost, dropped) else None

        stats = await eventually(reported, f"the lossy subscriber reports about {dropped} lost")
        village_audio = subscriber_of(stats, audio_id, village_pid)
        specialist_audio = subscriber_of(stats, audio_id, specialist_pid)
        intake = track_of(stats, audio_id)["intake"]
        summary = f"dropped {dropped}: {village_audio} / {specialist_audio} / {intake}"
        assert village_audio["rtt_s"] is not None and village_audio["jitter_s"] is not None
        assert specialist_audio["packets_lost"] is not None, summary
        assert specialist_audio["packets_lost"] <= 1, summary
        assert intake["packets_lost"] <= 1, summary

        text = await metrics(server)
        lost = {
            who: series(
                text,
                "telemed_media_hop_packets_lost_total",
                participant=who,
                track=audio_id,
                direction="subscriber",
            )
            for who in (village_pid, specialist_pid)
        }
        assert near(int(lost[village_pid]), dropped) and lost[specialist_pid] <= 1, (lost, summary)
        assert series(text, "telemed_media_hop_rtt_seconds", participant=village_pid) >= 0
    finally:
        link.close()


def node_count(text: str, name: str) -> float:
    (value,) = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


async def test_hop_series_go_with_their_track_and_node_counts_stay(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    village = await media_room.seated(VILLAGE, cid, label="village")
    assert await county.publish([(ToneTrack(500.0), "microphone")]) == {"ok": True}
    county_pid = county.peer.participant_id
    await eventually(lambda: len(village.offered_from(county_pid, "audio")) == 1, "the offer")
    (audio_id,) = village.offered_from(county_pid, "audio")
    await eventually(lambda: village.frames_of(audio_id) >= 20, "audio at the subscriber")
    text = await metrics(server)
    assert f'track="{audio_id}"' in text
    assert 'direction="intake"' in text and 'direction="subscriber"' in text
    received = node_count(text, "telemed_media_frames_received_total")
    forwarded = node_count(text, "telemed_media_frames_forwarded_total")
    assert received >= 20 and forwarded >= 20, text
    await county.peer.ok("leave")
    await eventually(lambda: not media_room.hub.tracks(cid), "the track ends")
    text = await metrics(server)
    assert f'track="{audio_id}"' not in text
    # Counters of the node count what happened, not what is there: they never go down.
    assert node_count(text, "telemed_media_frames_received_total") >= received
    assert node_count(text, "telemed_media_frames_forwarded_total") >= forwarded
    assert node_count(text, "telemed_media_publications") == 0


async def publishers_reported_loss(client: TrackingMediaClient) -> float | None:
    """The fraction lost (0..1) in the newest receiver report the relay sent about the
    client's published audio, as the client's own statistics show it (None before one)."""
    sender = next(t.sender for t in client.publisher.getTransceivers() if t.kind == "audio")
    stats = await sender.getStats()
    remote = [s for s in stats.values() if s.type == "remote-inbound-rtp"]
    return float(remote[0].fractionLost) / 256 if remote else None


async def test_a_subscribers_loss_reaches_the_audio_publisher_for_its_fec(
    media_room: MediaRoom,
) -> None:
    """The relay forwards the publisher's Opus packets as they are, so only the publisher can
    add the in-band FEC that a subscriber's lossy downlink needs, and its encoder adds FEC for
    the loss its receiver reports say: the relay's reports to it carry the worst subscriber's
    loss while that is fresh, though the publisher's own uplink loses nothing."""
    link = LossyLink(Impairment(), Impairment(loss=0.10), seed=11)
    await link.open()
    try:
        call = await audio_to_a_lossy_subscriber(media_room, link)

        async def told(at_least: float) -> bool:
            lost = await publishers_reported_loss(call.county)
            return lost is not None and lost >= at_least

        await eventually(lambda: told(0.03), "the village's downlink loss told to the county")
        intake = track_of(await media_stats(media_room.server, call.cid), call.audio_id)["intake"]
        assert intake["packets_lost"] <= 1, intake  # the county's own link is clean

        # Once the lossy subscriber is gone, the reports say the publisher's own loss again.
        await call.village.peer.ok("leave")

        async def clean() -> bool:
            return await publishers_reported_loss(call.county) == 0

        await eventually(clean, "the county told of no loss once the village left", within=15)
    finally:
        link.close()
